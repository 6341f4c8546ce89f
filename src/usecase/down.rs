//! `down`: remove every object tagged as the lab's (never anything else), its console logs, then
//! its state. Works from the tags alone when the state is missing, damaged or from an older klab.

use super::{Env, Error, chain, find_lab};
use crate::reconcile::{self, Action, KnownObjects, Left};

pub struct DownRequest {
    pub lab: String,
    /// `--connect` / `KLAB_CONNECT`; else the URI recorded in the lab's state.
    pub connect: Option<String>,
    pub dry_run: bool,
    pub keep_state: bool,
}

#[derive(Debug)]
pub struct DownOutcome {
    pub lab: String,
    pub dry_run: bool,
    pub actions: Vec<Action>,
    pub left: Vec<Left>,
    pub state_kept: bool,
}

pub async fn down(env: &Env, req: DownRequest) -> Result<DownOutcome, Error> {
    let state = env.paths.state(&req.lab);
    let had_dir = state.path().exists();
    let _lock = if req.dry_run {
        None
    } else {
        Some(state.lock()?)
    };
    let result = run(env, &req).await;
    if let Ok(out) = &result
        && !out.dry_run
    {
        // Its networks are gone: the subnets are free for other labs and copies again. The lock
        // may wait for another klab: off the async runtime.
        let registry = crate::registry::Registry::new(&env.paths.data_root);
        let lab = req.lab.clone();
        let released = super::blocking(move || {
            let mut g = registry.lock().map_err(|e| Error::Internal(chain(&e)))?;
            if g.entries.labs.remove(&lab).is_some() {
                g.save().map_err(|e| Error::Internal(chain(&e)))?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = released {
            env.printer.note(format!("warning: {e}"));
        }
    }
    if result.is_err() && !had_dir {
        // The lock created the directory; a failed down must not leave it behind.
        if let Err(e) = state.remove() {
            tracing::warn!("{}", chain(&e));
        }
    }
    result
}

async fn run(env: &Env, req: &DownRequest) -> Result<DownOutcome, Error> {
    let lab = req.lab.as_str();
    let state = env.paths.state(lab);
    let found = find_lab(env, req.connect.as_deref(), &state).await?;
    for d in &found.damaged {
        env.printer.note(format!(
            "note: {d}; removing the lab by its objects' klab tags instead"
        ));
    }
    let facts = found.facts.clone().unwrap_or_default();
    let known = KnownObjects {
        pool: facts
            .pool
            .as_ref()
            .map(|p| (p.name.clone(), p.owned.unwrap_or(true))),
        volumes: facts
            .nodes
            .iter()
            .flat_map(|n| [n.overlay.as_ref(), n.seed.as_ref()])
            .flatten()
            .map(|f| f.name.clone())
            .collect(),
    };
    let todo = reconcile::plan_down(lab, &found.observed, &known);
    if req.dry_run {
        return Ok(DownOutcome {
            lab: lab.to_string(),
            dry_run: true,
            actions: todo.actions,
            left: todo.left,
            state_kept: true,
        });
    }
    crate::exec::apply_down(&found.backend, &env.printer, &todo.actions)
        .await
        .map_err(|e| {
            Error::user(
                format!("lab {lab} is only partly removed: {}", chain(&e)),
                format!("run `klab down {lab}` again; it removes what is left"),
            )
        })?;

    // Console logs: the ones the plan names, and `<console dir>/<domain>.log` of every domain
    // removed (a lab whose plan is gone still has its tagged domains).
    let mut logs: Vec<std::path::PathBuf> = facts
        .nodes
        .iter()
        .filter_map(|n| n.console_log.as_ref().map(Into::into))
        .collect();
    for a in &todo.actions {
        if let Action::RemoveDomain { domain, .. } = a {
            logs.push(env.paths.console_dir().join(format!("{domain}.log")));
        }
    }
    for log in logs {
        match std::fs::remove_file(&log) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => env
                .printer
                .note(format!("note: cannot remove {}: {e}", log.display())),
        }
    }
    if req.keep_state {
        // Keys and plan stay for the next `up`; what was built and verified is gone, and so are
        // the snapshots (they went with the domains): a record of one would make the next
        // `up --snapshot` keep a snapshot that does not exist.
        state.remove_journal()?;
        super::snapshot::clear_records(&state)?;
    } else {
        state.remove()?;
    }
    Ok(DownOutcome {
        lab: lab.to_string(),
        dry_run: false,
        actions: todo.actions,
        left: todo.left,
        state_kept: req.keep_state,
    })
}
