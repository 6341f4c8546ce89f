//! `klab provision` and `klab kubeconfig`, and the cluster summary `klab up` prints too.

use std::path::PathBuf;

use serde_json::json;

use super::{CmdError, resolve_lab_name, templates};
use crate::cli::{GlobalArgs, KubeconfigArgs, ProvisionArgs};
use crate::output::Printer;
use crate::plan::LabPlan;
use crate::usecase::provision::{KUBECONFIG_FILE, ProvisionOutcome, ProvisionRequest};

pub async fn provision(p: &Printer, g: &GlobalArgs, args: &ProvisionArgs) -> Result<(), CmdError> {
    let lab = super::with_copy(
        resolve_lab_name(args.name.clone(), args.file.clone())?,
        args.copy.clone(),
    )?;
    let env = super::env(p);
    let req = ProvisionRequest {
        lab: lab.clone(),
        templates: templates(g)?,
        from: args.from.clone(),
        only: args.node.clone(),
        allow_unpinned: args.allow_unpinned,
        jobs: args.jobs,
        host: Default::default(),
    };
    let outcome = crate::usecase::provision::provision_lab(&env, req).await?;
    let plan = env.paths.state(&lab).load_plan()?.ok_or_else(|| {
        CmdError::Internal(format!("the plan of lab {lab} disappeared while it ran"))
    })?;
    if p.is_json() {
        p.json(&cluster_json(&plan, &outcome));
    } else {
        cluster_summary(p, &plan, &outcome);
    }
    Ok(())
}

/// The `kubernetes` object of `up -o json` and `provision -o json`.
pub fn cluster_json(plan: &LabPlan, o: &ProvisionOutcome) -> serde_json::Value {
    let k = plan.kubernetes.as_ref();
    json!({
        "lab": plan.lab,
        "changed": o.changed,
        "version": o.kubernetes_version,
        "endpoint": o.endpoint,
        "kubeconfig": o.kubeconfig,
        "unreachable": o.unreachable,
        "nodes": k.map(|k| k.control_planes.iter().map(|n| (n, "control-plane"))
            .chain(k.workers.iter().map(|n| (n, "worker")))
            .map(|(n, role)| json!({
                "name": n,
                "role": role,
                "node_ip": plan.node(n).map(|s| s.cluster_ip),
            }))
            .collect::<Vec<_>>()),
        "phases": o.phases,
        "seconds": o.seconds,
        "overhead": o.overhead,
        "verification": o.verification,
    })
}

/// Nodes, roles, version, addresses, time per phase, and how to use the cluster.
pub fn cluster_summary(p: &Printer, plan: &LabPlan, o: &ProvisionOutcome) {
    let Some(k) = &plan.kubernetes else { return };
    let version = o
        .kubernetes_version
        .as_deref()
        .map(|v| format!("v{v}"))
        .unwrap_or_else(|| format!("v{}", k.version));
    if o.changed {
        p.line(format!(
            "kubernetes {version} is ready on lab {}: API https://{} ({:.0}s)",
            plan.lab, o.endpoint, o.seconds
        ));
    } else {
        p.line(format!(
            "kubernetes {version} on lab {} is up to date: every phase finished, nothing changed",
            plan.lab
        ));
    }
    let width = k
        .control_planes
        .iter()
        .chain(&k.workers)
        .map(String::len)
        .max()
        .unwrap_or(4);
    for (n, role) in k
        .control_planes
        .iter()
        .map(|n| (n, "control-plane"))
        .chain(k.workers.iter().map(|n| (n, "worker")))
    {
        let ip = plan
            .node(n)
            .map(|s| s.cluster_ip.to_string())
            .unwrap_or_default();
        p.line(format!(
            "  {n:<width$}  {role:<13}  {version}  node-ip {ip} ({})",
            k.cluster_network
        ));
    }
    if o.changed {
        let timed: Vec<String> = o
            .phases
            .iter()
            .filter(|ph| !ph.ran.is_empty() || !ph.already.is_empty())
            .map(|ph| format!("{} {:.1}s", ph.phase, ph.seconds))
            .collect();
        p.note(format!("phases: {}", timed.join(", ")));
        if let Some(ov) = &o.overhead {
            p.note(format!(
                "klab's own share: {:.1}s of {:.1}s in phases ({:.1} %; {} commands)",
                ov.seconds,
                ov.phases_seconds,
                ov.share * 100.0,
                ov.commands
            ));
        }
    }
    for line in verification_lines(o) {
        p.note(line);
    }
    if let Some(why) = &o.unreachable {
        p.note(format!("note: {why}"));
    }
    if let Some(path) = &o.kubeconfig {
        p.line(format!(
            "use it:         export KUBECONFIG={}   (or: klab kubeconfig {} --merge)",
            path.display(),
            plan.lab
        ));
    }
}

/// What the verify phase established on this run, and what it did not: never "verified" for a
/// check that only warned.
fn verification_lines(o: &ProvisionOutcome) -> Vec<String> {
    let Some(v) = &o.verification else {
        return if o.changed {
            vec!["not verified on this run: the verify phase did not run".to_string()]
        } else {
            Vec::new()
        };
    };
    let mut out = Vec::new();
    if !v.verified.is_empty() {
        out.push(format!("verified: {}", v.verified.join("; ")));
    }
    for u in &v.not_verified {
        out.push(format!("NOT verified: {}: {}", u.check, u.why));
    }
    out
}

pub fn kubeconfig(p: &Printer, args: &KubeconfigArgs) -> Result<(), CmdError> {
    let lab = super::with_copy(
        resolve_lab_name(args.name.clone(), args.file.clone())?,
        args.copy.clone(),
    )?;
    let state = crate::usecase::Paths::from_env().state(&lab);
    let path = state.path().join(KUBECONFIG_FILE);
    let Some(text) = state.read_file(KUBECONFIG_FILE)? else {
        return Err(CmdError::user(
            format!("lab {lab} has no kubeconfig yet"),
            "`klab up` hands it over once the cluster is built (a lab needs [kubernetes]); `klab status` shows the lab",
        ));
    };
    if args.path {
        if p.is_json() {
            p.json(&json!({ "lab": lab, "kubeconfig": path }));
        } else {
            p.line(path.display().to_string());
        }
        return Ok(());
    }
    if !args.merge {
        // The file itself on stdout (`klab kubeconfig LAB > file`); -o json changes nothing here.
        crate::output::stdout(&text);
        return Ok(());
    }
    let target = user_kubeconfig().ok_or_else(|| {
        CmdError::user(
            "cannot tell where your kubeconfig is: neither KUBECONFIG nor HOME is set",
            "set KUBECONFIG to the file to merge into",
        )
    })?;
    let existing = match std::fs::read_to_string(&target) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(CmdError::user(
                format!("cannot read {}: {e}", target.display()),
                "fix the file's permissions, or point KUBECONFIG at another file",
            ));
        }
    };
    let merged = crate::kubeconfig::merge(existing.as_deref(), &text, true).map_err(|e| {
        CmdError::user(
            format!("{}: {e}", target.display()),
            "klab leaves a file it cannot read as a kubeconfig alone; fix it or point KUBECONFIG at another file",
        )
    })?;
    write_owner_only(&target, merged.expose())?;
    if p.is_json() {
        p.json(&json!({ "lab": lab, "merged_into": target, "context": lab }));
    } else {
        p.line(format!(
            "merged lab {lab} into {} as context `{lab}` (now the current context)",
            target.display()
        ));
    }
    Ok(())
}

/// kubectl's rule: the first file of `$KUBECONFIG`, else `~/.kube/config`.
fn user_kubeconfig() -> Option<PathBuf> {
    if let Ok(v) = std::env::var("KUBECONFIG")
        && let Some(first) = std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty())
    {
        return Some(first);
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube").join("config"))
}

/// Atomic replace with mode 0600 (the file holds the admin's client key).
fn write_owner_only(path: &std::path::Path, text: &str) -> Result<(), CmdError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| {
        CmdError::user(
            format!("cannot write {}: {e}", path.display()),
            "check the directory's permissions, or point KUBECONFIG at another file",
        )
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("klab-tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, path).map_err(fail)
}

/// Removes the lab's cluster, user and context from the user's kubeconfig when `--merge` put them
/// there. A note says what happened; a file klab cannot read as a kubeconfig is left alone.
pub fn forget_merged(lab: &str) -> Option<String> {
    let target = user_kubeconfig()?;
    let text = std::fs::read_to_string(&target).ok()?;
    match crate::kubeconfig::remove_lab(&text, lab) {
        Ok(Some(rest)) => match write_owner_only(&target, rest.expose()) {
            Ok(()) => Some(format!(
                "removed lab {lab}'s context from {}",
                target.display()
            )),
            Err(e) => Some(format!("warning: {e}")),
        },
        Ok(None) => None,
        Err(e) => Some(format!(
            "warning: {}: {e}; the lab's context (if any) was left there",
            target.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usecase::provision::{Unverified, Verification};

    fn outcome(verification: Option<Box<Verification>>) -> ProvisionOutcome {
        ProvisionOutcome {
            changed: true,
            kubernetes_version: Some("1.36.4".into()),
            endpoint: "10.0.0.11:6443".into(),
            kubeconfig: None,
            unreachable: None,
            phases: Vec::new(),
            seconds: 1.0,
            overhead: None,
            verification,
        }
    }

    #[test]
    fn a_check_that_only_warned_is_not_called_verified() {
        let o = outcome(Some(Box::new(Verification {
            verified: vec![
                "node InternalIPs on the cluster network".into(),
                "calico-node addresses on the cluster network".into(),
            ],
            not_verified: vec![Unverified {
                check: "a pod on another node answers through the pod network".into(),
                why: "no CoreDNS pod runs on another node than cp1".into(),
            }],
        })));
        assert_eq!(
            verification_lines(&o),
            [
                "verified: node InternalIPs on the cluster network; calico-node addresses on the cluster network",
                "NOT verified: a pod on another node answers through the pod network: no CoreDNS pod runs on another node than cp1",
            ]
        );
        let text = verification_lines(&o).join("\n");
        assert!(!text.contains("pinning verified"), "{text}");
    }

    #[test]
    fn no_verify_run_claims_nothing() {
        assert_eq!(
            verification_lines(&outcome(None)),
            ["not verified on this run: the verify phase did not run"]
        );
        let unchanged = ProvisionOutcome {
            changed: false,
            ..outcome(None)
        };
        assert!(verification_lines(&unchanged).is_empty());
    }
}
