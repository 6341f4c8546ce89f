//! `klab down`: arguments → [`crate::usecase::down`] → what was removed and what was left.

use serde_json::json;

use super::{CmdError, chain, resolve_lab_name};
use crate::cli::{DownArgs, GlobalArgs};
use crate::output::Printer;
use crate::usecase::down::DownRequest;

pub async fn down(p: &Printer, g: &GlobalArgs, args: &DownArgs) -> Result<(), CmdError> {
    let base = resolve_lab_name(args.name.clone(), args.file.clone())?;
    if !args.all_copies {
        let lab = match &args.copy {
            Some(c) => super::with_copy(base, Some(c.clone()))?,
            None => base,
        };
        let out = down_one(p, g, args, &lab).await?;
        if p.is_json() {
            p.json(&out);
        }
        return Ok(());
    }
    let entries = crate::registry::Registry::new(&crate::paths::data_root())
        .read()
        .map_err(|e| CmdError::user(chain(&e), "remove the damaged registry.json"))?;
    let copies: Vec<String> = entries
        .copies_of(&base)
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    if copies.is_empty() && !p.is_json() {
        p.line(format!("lab {base} has no copies on this host"));
        return Ok(());
    }
    // Every copy is tried, also after one failed; one JSON document for all of them.
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for lab in &copies {
        match down_one(p, g, args, lab).await {
            Ok(out) => done.push(out),
            Err(e) => {
                if !p.is_json() {
                    p.note(format!("error: copy {lab}: {e}"));
                    if let Some(h) = e.hint() {
                        p.note(format!("  hint: {h}"));
                    }
                }
                failed.push((lab.clone(), e));
            }
        }
    }
    if p.is_json() {
        p.json(&all_copies_json(&base, done, &failed));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CmdError::user(
            format!(
                "{} of {} copies of lab {base} are not removed:\n  {}",
                failed.len(),
                copies.len(),
                failed
                    .iter()
                    .map(|(lab, e)| format!("{lab}: {e}"))
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ),
            format!(
                "fix the cause and run `klab down {base} --all-copies` again (it removes what is left)"
            ),
        ))
    }
}

/// PURE: `down --all-copies` as one document: what each copy's down did, and every failure.
fn all_copies_json(
    base: &str,
    copies: Vec<serde_json::Value>,
    failed: &[(String, CmdError)],
) -> serde_json::Value {
    json!({
        "lab": base,
        "copies": copies,
        "failed": failed
            .iter()
            .map(|(lab, e)| json!({ "lab": lab, "error": e.to_string(), "hint": e.hint() }))
            .collect::<Vec<_>>(),
    })
}

/// One lab's down; the text lines are printed here, the JSON document is returned.
async fn down_one(
    p: &Printer,
    g: &GlobalArgs,
    args: &DownArgs,
    lab: &str,
) -> Result<serde_json::Value, CmdError> {
    let out = crate::usecase::down::down(
        &super::env(p),
        DownRequest {
            lab: lab.to_string(),
            connect: g.connect.clone(),
            dry_run: args.dry_run,
            keep_state: args.keep_state,
        },
    )
    .await?;
    if out.dry_run {
        if !p.is_json() {
            p.line(format!("klab down would, for lab {lab}:"));
            for a in &out.actions {
                p.line(format!("  {}", a.describe()));
            }
            for l in &out.left {
                p.line(format!("  leave {} {} ({})", l.kind, l.name, l.reason));
            }
        }
        return Ok(
            json!({ "lab": lab, "dry_run": true, "actions": out.actions, "left": out.left }),
        );
    }
    // The lab's context in the user's kubeconfig (`klab kubeconfig --merge`) points at nothing now.
    let kubeconfig = if out.state_kept {
        None
    } else {
        super::kube::forget_merged(lab)
    };
    if let Some(note) = &kubeconfig {
        p.note(note);
    }
    if !p.is_json() {
        for l in &out.left {
            p.line(format!("left {} {}: {}", l.kind, l.name, l.reason));
        }
        if out.actions.is_empty() {
            p.line(format!("lab {lab}: nothing to remove"));
        } else {
            p.line(format!("lab {lab} removed ({} objects)", out.actions.len()));
        }
    }
    Ok(
        json!({ "lab": lab, "removed": out.actions, "left": out.left, "state_kept": out.state_kept, "kubeconfig": kubeconfig }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_copies_make_one_document_naming_every_failure() {
        let failed = vec![(
            "demo-2".to_string(),
            CmdError::user("lab demo-2 is only partly removed", "run it again"),
        )];
        let doc = all_copies_json("demo", vec![json!({ "lab": "demo-1" })], &failed);
        assert_eq!(doc["lab"], "demo");
        assert_eq!(doc["copies"][0]["lab"], "demo-1");
        assert_eq!(doc["failed"][0]["lab"], "demo-2");
        assert_eq!(
            doc["failed"][0]["error"],
            "lab demo-2 is only partly removed"
        );
        assert_eq!(doc["failed"][0]["hint"], "run it again");
        // One document: it parses back whole.
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, doc);
    }
}
