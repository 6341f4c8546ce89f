//! `klab down`: remove every object tagged as the lab's (never anything else), then its state.

use serde_json::json;

use super::{CmdError, chain, resolve_lab_name};
use crate::cli::{DownArgs, GlobalArgs};
use crate::output::Printer;
use crate::reconcile::{self, KnownObjects};
use crate::state::StateDir;

pub async fn down(p: &Printer, g: &GlobalArgs, args: &DownArgs) -> Result<(), CmdError> {
    let lab = resolve_lab_name(args.name.clone(), args.file.clone())?;
    let state = StateDir::new(&crate::paths::state_root(), &lab);
    let _lock = if args.dry_run {
        None
    } else {
        Some(state.lock()?)
    };
    let super::ExistingLab {
        backend,
        observed,
        saved,
        ..
    } = super::find_lab(g, &state).await?;
    let known = KnownObjects {
        // Every lab's pool is its own (`[host] pool` is gone).
        pool: saved.as_ref().map(|s| (s.pool.name.clone(), true)),
        volumes: saved
            .iter()
            .flat_map(|s| &s.nodes)
            .flat_map(|n| [n.overlay.name.clone(), n.seed.name.clone()])
            .collect(),
    };
    let todo = reconcile::plan_down(&lab, &observed, &known);

    if args.dry_run {
        if p.is_json() {
            p.json(
                &json!({ "lab": lab, "dry_run": true, "actions": todo.actions, "left": todo.left }),
            );
        } else {
            p.line(format!("klab down would, for lab {lab}:"));
            for a in &todo.actions {
                p.line(format!("  {}", a.describe()));
            }
            for l in &todo.left {
                p.line(format!("  leave {} {} ({})", l.kind, l.name, l.reason));
            }
        }
        return Ok(());
    }

    crate::exec::apply_down(&backend, p, &todo.actions)
        .await
        .map_err(|e| {
            CmdError::user(
                format!("lab {lab} is only partly removed: {}", chain(&e)),
                format!("run `klab down {lab}` again; it removes what is left"),
            )
        })?;
    if !args.keep_state {
        drop(_lock);
        state.remove()?;
    }
    if p.is_json() {
        p.json(&json!({ "lab": lab, "removed": todo.actions, "left": todo.left, "state_kept": args.keep_state }));
    } else {
        for l in &todo.left {
            p.line(format!("left {} {}: {}", l.kind, l.name, l.reason));
        }
        if todo.actions.is_empty() {
            p.line(format!("lab {lab}: nothing to remove"));
        } else {
            p.line(format!(
                "lab {lab} removed ({} objects)",
                todo.actions.len()
            ));
        }
    }
    Ok(())
}
