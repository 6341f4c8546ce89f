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
    let req = UpRequest {
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
        lab,
    };
    match crate::usecase::up::up(&super::env(p), req).await? {
        UpOutcome::DryRun { plan, todo } => {
            if p.is_json() {
                p.json(&json!({ "lab": plan.lab, "dry_run": true, "actions": todo.actions, "unchanged": todo.unchanged, "drift": todo.drift }));
            } else if todo.is_noop() {
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
            drift,
            kubernetes,
        } => report(
            p,
            &plan,
            &reports,
            !changed,
            accel,
            &drift,
            kubernetes.as_ref(),
        ),
    }
    Ok(())
}

fn report(
    p: &Printer,
    plan: &LabPlan,
    reports: &[NodeReport],
    noop: bool,
    accel: Accel,
    drift: &[crate::reconcile::Drift],
    kubernetes: Option<&crate::usecase::provision::ProvisionOutcome>,
) {
    if p.is_json() {
        p.json(&json!({
            "lab": plan.lab,
            "changed": !noop,
            "kubernetes": kubernetes.map(|k| super::kube::cluster_json(plan, k)),
            "accelerator": accel.as_str(),
            "drift": drift,
            "nodes": plan.nodes.iter().map(|n| json!({
                "name": n.name,
                "role": n.role.as_str(),
                "domain": n.domain,
                "ssh": n.ssh_address,
                "cluster_ip": n.cluster_ip,
                "report": reports.iter().find(|r| r.node == n.name),
            })).collect::<Vec<_>>(),
        }));
        return;
    }
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
