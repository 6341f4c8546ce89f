//! `klab up`: arguments → [`crate::usecase::up`] → the report (how to reach the lab).

use serde_json::json;

use super::{CmdError, load_lab, requested_accel, resolve_uri, templates};
use crate::cli::{GlobalArgs, UpArgs};
use crate::exec::NodeReport;
use crate::model::Accel;
use crate::output::Printer;
use crate::plan::LabPlan;
use crate::usecase::up::{UpOutcome, UpRequest};

pub async fn up(p: &Printer, g: &GlobalArgs, args: &UpArgs) -> Result<(), CmdError> {
    let lab = load_lab(&args.file)?;
    if lab.host.backend == crate::model::BackendKind::Hyperv {
        return hyperv_up(p, g, args, &lab);
    }
    let copies: Vec<Option<String>> = match (args.copies, args.copy.is_empty()) {
        (Some(0), _) => {
            return Err(CmdError::user(
                "--copies 0 brings up nothing",
                "give the number of copies (1 or more), or leave --copies out for the lab itself",
            ));
        }
        (Some(n), _) => (1..=n).map(|i| Some(i.to_string())).collect(),
        (None, false) => args.copy.iter().cloned().map(Some).collect(),
        (None, true) => vec![None],
    };
    let env = super::env(p);
    let request = |copy: Option<String>| -> Result<UpRequest, CmdError> {
        Ok(UpRequest {
            uri: resolve_uri(g, Some(&lab)),
            accel: requested_accel(g, Some(&lab)),
            templates: templates(g)?,
            lab_file: Some(args.file.clone()),
            dry_run: args.dry_run,
            recreate: args.recreate.iter().cloned().collect(),
            jobs: args.jobs,
            host: Default::default(),
            kubernetes: !args.no_kubernetes,
            allow_unpinned: args.allow_unpinned,
            copy,
            subnet_pool: args.subnet_pool,
            lab: lab.clone(),
        })
    };
    if copies == [None] {
        let out = crate::usecase::up::up(&env, request(None)?).await?;
        forget_rebuilt(p, g, &env, &out).await;
        if args.snapshot && !args.dry_run {
            initial_snapshot(p, g, &env, &out).await?;
        }
        if p.is_json() {
            p.json(&outcome_json(&out));
        } else {
            outcome_text(p, &out);
        }
        return Ok(());
    }
    // Copies come up together; each is its own lab with its own lock and state.
    let mut runs = Vec::new();
    for c in &copies {
        let req = request(c.clone())?;
        let env = env.clone();
        runs.push(async move { crate::usecase::up::up(&env, req).await });
    }
    let results = futures::future::join_all(runs).await;
    let mut failed = Vec::new();
    let mut done = Vec::new();
    for (c, r) in copies.iter().zip(results) {
        let c = c.clone().unwrap_or_default();
        if let Ok(out) = &r {
            forget_rebuilt(p, g, &env, out).await;
        }
        let r = match r {
            Ok(out) if args.snapshot && !args.dry_run => {
                initial_snapshot(p, g, &env, &out).await.map(|()| out)
            }
            other => other,
        };
        match r {
            Ok(out) => {
                if !p.is_json() {
                    outcome_text(p, &out);
                }
                done.push(outcome_json(&out));
            }
            Err(e) => {
                p.note(format!("error: copy {c}: {e}"));
                if let Some(h) = e.hint() {
                    p.note(format!("  hint: {h}"));
                }
                failed.push(json!({ "copy": c, "error": e.to_string(), "hint": e.hint() }));
            }
        }
    }
    if p.is_json() {
        p.json(&json!({ "lab": lab.name, "copies": done, "failed": failed }));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CmdError::user(
            format!("{} of {} copies are not up", failed.len(), copies.len()),
            "fix the cause and run the same command again (copies that are up are left as they are), or remove them with `klab down LAB --all-copies`",
        ))
    }
}

/// A Hyper-V lab never falls through to libvirt: `--dry-run` prints the PowerShell scripts of the
/// up, a real run says what it needs.
fn hyperv_up(
    p: &Printer,
    g: &GlobalArgs,
    args: &UpArgs,
    lab: &crate::model::Lab,
) -> Result<(), CmdError> {
    let unsupported = [
        (
            args.copies.is_some() || !args.copy.is_empty(),
            "--copy/--copies",
        ),
        (args.snapshot, "--snapshot"),
    ];
    if let Some((_, flag)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(CmdError::user(
            format!(
                "{flag} needs the libvirt backend; lab {} uses Hyper-V",
                lab.name
            ),
            format!("leave {flag} out, or remove `backend = \"hyperv\"` from [host]"),
        ));
    }
    let t = std::sync::Arc::new(templates(g)?);
    if !args.dry_run {
        return Err(crate::usecase::hyperv::refuse_real_up(lab, t));
    }
    let mut inputs = super::offline_inputs(lab, g);
    inputs.uri = "hyperv".into();
    let out = crate::usecase::hyperv::dry_run_up(lab, &inputs, t)?;
    if p.is_json() {
        p.json(&json!({
            "lab": out.lab,
            "backend": "hyperv",
            "dry_run": true,
            "actions": out.actions,
            "scripts": out.scripts.iter().map(|s| json!({"op": s.op, "object": s.object, "script": s.text})).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    p.note(format!(
        "lab {}: Hyper-V dry run — {} PowerShell scripts, nothing executed",
        out.lab,
        out.scripts.len()
    ));
    for s in &out.scripts {
        p.line(format!("# ---- {} ----\n{}", s.key(), s.text.trim_end()));
    }
    Ok(())
}

/// Nodes `up` built from clean disks took no part in the lab's snapshots: those snapshots go (a
/// warning, never a failed `up`).
async fn forget_rebuilt(p: &Printer, g: &GlobalArgs, env: &crate::usecase::Env, out: &UpOutcome) {
    let UpOutcome::Done { plan, reports, .. } = out else {
        return;
    };
    let rebuilt: std::collections::BTreeSet<String> = reports
        .iter()
        .filter(|r| r.created)
        .map(|r| r.node.clone())
        .collect();
    if rebuilt.is_empty() {
        return;
    }
    match crate::usecase::snapshot::forget_rebuilt(env, &plan.lab, &rebuilt, g.connect.as_deref())
        .await
    {
        Ok(dropped) if dropped.is_empty() => {}
        Ok(dropped) => p.note(format!(
            "lab {}: snapshot {} dropped: {} started from a clean disk since",
            plan.lab,
            dropped
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "),
            rebuilt.iter().cloned().collect::<Vec<_>>().join(", ")
        )),
        Err(e) => p.note(format!(
            "warning: lab {}: its snapshots could not be checked after the rebuild: {e}",
            plan.lab
        )),
    }
}

/// `up --snapshot`: the snapshot `reset` goes back to, taken once the lab is ready (an existing one
/// that every node still holds is kept: a rerun of `up --snapshot` must not move the lab's
/// starting point; a stale record is replaced).
async fn initial_snapshot(
    p: &Printer,
    g: &GlobalArgs,
    env: &crate::usecase::Env,
    out: &UpOutcome,
) -> Result<(), CmdError> {
    let UpOutcome::Done { plan, .. } = out else {
        return Ok(());
    };
    let initial = crate::usecase::snapshot::INITIAL;
    if crate::usecase::snapshot::list(env, &plan.lab, g.connect.as_deref())
        .await?
        .iter()
        .any(|s| s.info.name == initial && s.usable())
    {
        p.note(format!(
            "lab {}: keeping its snapshot `{initial}` (`klab snapshot delete {} {initial}` first to take a new one)",
            plan.lab, plan.lab
        ));
        return Ok(());
    }
    let info = crate::usecase::snapshot::save(
        env,
        &plan.lab,
        initial,
        g.connect.as_deref(),
        &templates(g)?,
    )
    .await?;
    p.note(format!(
        "lab {}: snapshot `{initial}` taken (paused {:.1}s); `klab reset {}` goes back to it",
        plan.lab, info.paused_seconds, plan.lab
    ));
    Ok(())
}

fn outcome_json(out: &UpOutcome) -> serde_json::Value {
    match out {
        UpOutcome::DryRun { plan, todo } => {
            json!({ "lab": plan.lab, "dry_run": true, "actions": todo.actions, "unchanged": todo.unchanged, "drift": todo.drift })
        }
        UpOutcome::Done {
            plan,
            accel,
            changed,
            reports,
            drift,
            kubernetes,
        } => json!({
            "lab": plan.lab,
            "changed": changed,
            "kubernetes": kubernetes.as_ref().map(|k| super::kube::cluster_json(plan, k)),
            "accelerator": accel.as_str(),
            "drift": drift,
            "networks": plan.networks.iter().map(|n| json!({"name": n.name, "cidr": format!("{}/{}", n.address, n.prefix), "bridge": n.bridge})).collect::<Vec<_>>(),
            "nodes": plan.nodes.iter().map(|n| json!({
                "name": n.name,
                "role": n.role.as_str(),
                "domain": n.domain,
                "ssh": n.ssh_address,
                "cluster_ip": n.cluster_ip,
                "report": reports.iter().find(|r| r.node == n.name),
            })).collect::<Vec<_>>(),
        }),
    }
}

fn outcome_text(p: &Printer, out: &UpOutcome) {
    match out {
        UpOutcome::DryRun { plan, todo } => {
            if todo.is_noop() {
                p.line(format!("lab {} is up to date; nothing to do", plan.lab));
            } else {
                p.line(format!("klab up would, for lab {}:", plan.lab));
                for a in &todo.actions {
                    p.line(format!("  {}", a.describe()));
                }
            }
        }
        UpOutcome::Done {
            plan,
            accel,
            changed,
            reports,
            kubernetes,
            ..
        } => report(p, plan, reports, !changed, *accel, kubernetes.as_ref()),
    }
}

fn report(
    p: &Printer,
    plan: &LabPlan,
    reports: &[NodeReport],
    noop: bool,
    accel: Accel,
    kubernetes: Option<&crate::usecase::provision::ProvisionOutcome>,
) {
    if noop {
        p.line(format!(
            "lab {} is up to date: {} nodes running and verified, nothing changed",
            plan.lab,
            plan.nodes.len()
        ));
    } else {
        p.line(format!(
            "lab {} is up ({} accelerator)",
            plan.lab,
            accel.as_str()
        ));
    }
    for n in &plan.nodes {
        p.line(format!(
            "  {:<12} {:<13} ssh {}  cluster {}",
            n.name,
            n.role.as_str(),
            n.ssh_address,
            n.cluster_ip
        ));
    }
    for r in reports {
        if !r.timeline.is_empty() {
            tracing::info!(
                node = %r.node,
                "timeline: {}",
                r.timeline
                    .iter()
                    .map(|(s, t)| format!("{s} {t:.1}s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    match (kubernetes, &plan.kubernetes) {
        (Some(k), _) => super::kube::cluster_summary(p, plan, k),
        (None, Some(k)) => p.note(format!(
            "note: --no-kubernetes: the Kubernetes {} phases were not run; `klab up` without it (or `klab provision {}`) builds the cluster",
            k.version, plan.lab
        )),
        (None, None) => {}
    }
    let first = plan
        .nodes
        .first()
        .map(|n| n.name.as_str())
        .unwrap_or("NODE");
    p.line(format!(
        "reach a node:   klab ssh {first}   (or: klab ssh-config {} >> ~/.ssh/config)",
        plan.lab
    ));
    p.line(format!("remove the lab: klab down {}", plan.lab));
}
