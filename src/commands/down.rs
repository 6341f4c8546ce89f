//! `klab down`: arguments → [`crate::usecase::down`] → what was removed and what was left.

use serde_json::json;

use super::{CmdError, chain, resolve_lab_name};
use crate::cli::{DownArgs, GlobalArgs};
use crate::output::Printer;
use crate::usecase::down::DownRequest;

pub async fn down(p: &Printer, g: &GlobalArgs, args: &DownArgs) -> Result<(), CmdError> {
    let base = resolve_lab_name(args.name.clone(), args.file.clone())?;
    let labs: Vec<String> = if args.all_copies {
        let entries = crate::registry::Registry::new(&crate::paths::data_root())
            .read()
            .map_err(|e| CmdError::user(chain(&e), "remove the damaged registry.json"))?;
        let copies = entries.copies_of(&base);
        if copies.is_empty() {
            p.line(format!("lab {base} has no copies on this host"));
            return Ok(());
        }
        copies.into_iter().map(|(_, name)| name).collect()
    } else if let Some(c) = &args.copy {
        if !crate::copies::is_copy_name(c) {
            return Err(CmdError::user(
                format!("`{}` is not a copy name", crate::config::escape(c)),
                "`klab list` shows the copies on this host",
            ));
        }
        vec![crate::copies::copy_lab_name(&base, c)]
    } else {
        vec![base]
    };
    for lab in labs {
        down_one(p, g, args, lab).await?;
    }
    Ok(())
}

async fn down_one(
    p: &Printer,
    g: &GlobalArgs,
    args: &DownArgs,
    lab: String,
) -> Result<(), CmdError> {
    let out = crate::usecase::down::down(
        &super::env(p),
        DownRequest {
            lab: lab.clone(),
            connect: g.connect.clone(),
            dry_run: args.dry_run,
            keep_state: args.keep_state,
        },
    )
    .await?;
    if out.dry_run {
        if p.is_json() {
            p.json(
                &json!({ "lab": lab, "dry_run": true, "actions": out.actions, "left": out.left }),
            );
        } else {
            p.line(format!("klab down would, for lab {lab}:"));
            for a in &out.actions {
                p.line(format!("  {}", a.describe()));
            }
            for l in &out.left {
                p.line(format!("  leave {} {} ({})", l.kind, l.name, l.reason));
            }
        }
        return Ok(());
    }
    // The lab's context in the user's kubeconfig (`klab kubeconfig --merge`) points at nothing now.
    let kubeconfig = if out.state_kept {
        None
    } else {
        super::kube::forget_merged(&lab)
    };
    if let Some(note) = &kubeconfig {
        p.note(note);
    }
    if p.is_json() {
        p.json(&json!({ "lab": lab, "removed": out.actions, "left": out.left, "state_kept": out.state_kept, "kubeconfig": kubeconfig }));
    } else {
        for l in &out.left {
            p.line(format!("left {} {}: {}", l.kind, l.name, l.reason));
        }
        if out.actions.is_empty() {
            p.line(format!("lab {lab}: nothing to remove"));
        } else {
            p.line(format!("lab {lab} removed ({} objects)", out.actions.len()));
        }
    }
    Ok(())
}
