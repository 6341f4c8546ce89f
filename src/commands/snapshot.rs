//! `klab snapshot save|list|delete` and `klab reset`: arguments → [`crate::usecase::snapshot`].

use serde_json::json;

use super::{CmdError, resolve_lab_name, templates, with_copy};
use crate::cli::{GlobalArgs, SnapshotCommand};
use crate::output::Printer;
use crate::usecase::snapshot;

pub async fn snapshot(p: &Printer, g: &GlobalArgs, cmd: SnapshotCommand) -> Result<(), CmdError> {
    let env = super::env(p);
    match cmd {
        SnapshotCommand::Save {
            name,
            snapshot: snap,
            copy,
        } => {
            let lab = with_copy(resolve_lab_name(name, None)?, copy)?;
            let info =
                snapshot::save(&env, &lab, &snap, g.connect.as_deref(), &templates(g)?).await?;
            if p.is_json() {
                p.json(&json!({ "lab": lab, "snapshot": info }));
            } else {
                p.line(format!(
                    "lab {lab}: snapshot `{}` of {} nodes taken (paused {:.1}s); `klab reset {lab} --to {}` goes back to it",
                    info.name,
                    info.nodes.len(),
                    info.paused_seconds,
                    info.name
                ));
            }
        }
        SnapshotCommand::List { name, copy } => {
            let lab = with_copy(resolve_lab_name(name, None)?, copy)?;
            let list = snapshot::list(&env, &lab, g.connect.as_deref()).await?;
            if p.is_json() {
                p.json(&json!({ "lab": lab, "snapshots": list }));
            } else if list.is_empty() {
                p.line(format!("lab {lab} has no snapshots"));
            } else {
                for s in &list {
                    p.line(format!(
                        "{:<24} {} nodes, taken at {} (unix){}",
                        s.info.name,
                        s.info.nodes.len(),
                        s.info.created_at,
                        if s.usable() {
                            String::new()
                        } else {
                            format!(
                                "  STALE: gone from {} (`klab snapshot save {lab} {}` takes it again)",
                                s.missing_on.join(", "),
                                s.info.name
                            )
                        }
                    ));
                }
            }
        }
        SnapshotCommand::Delete {
            name,
            snapshot: snap,
            copy,
        } => {
            let lab = with_copy(super::check_lab_name(name)?, copy)?;
            snapshot::delete(&env, &lab, &snap, g.connect.as_deref()).await?;
            if p.is_json() {
                p.json(&json!({ "lab": lab, "deleted": snap }));
            } else {
                p.line(format!("lab {lab}: snapshot `{snap}` deleted"));
            }
        }
    }
    Ok(())
}

pub async fn reset(p: &Printer, g: &GlobalArgs, lab: String, to: &str) -> Result<(), CmdError> {
    let env = super::env(p);
    let meta = env.paths.state(&lab).load_meta().ok().flatten();
    let timeouts = crate::usecase::lab_timeouts(meta.as_ref());
    let out = snapshot::reset(&env, &lab, Some(to), g.connect.as_deref(), &timeouts).await?;
    if p.is_json() {
        p.json(&out);
    } else {
        p.line(format!(
            "lab {lab} is back at snapshot `{}` ({:.1}s): nodes running and verified{}",
            out.snapshot,
            out.seconds,
            match out.kubernetes_ready {
                Some(true) => ", every Kubernetes node Ready",
                _ => "",
            }
        ));
        for (n, behind) in &out.clock_behind {
            p.note(format!(
                "{n}: clock set to the host's ({behind:.0}s behind before)"
            ));
        }
    }
    Ok(())
}
