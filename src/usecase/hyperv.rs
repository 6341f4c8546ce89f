//! `up` for a lab with `[host] backend = "hyperv"`: the whole up flow — preflight, observe,
//! reconcile, every create — over a PowerShell runner. `--dry-run` runs it over a runner that
//! executes nothing and records the scripts, on any host. A real run needs Windows or WSL2 and
//! stops before anything changes, saying so: the post-boot path (pinned SSH, cloud-init,
//! verification, provisioning) is not driven through Hyper-V yet, and a lab that asked for
//! Hyper-V must never end up on libvirt instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::Error;
use crate::backend::hyperv::{DryRunRunner, HyperVBackend};
use crate::backend::{Backend, BackendError};
use crate::model::Lab;
use crate::plan::{LabPlan, PlanInputs};
use crate::reconcile::{Action, UpInput};
use crate::render::powershell::{HvLab, HvLayout, PsScript};
use crate::render::{RenderedLab, Templates};

/// What `up --dry-run` would do on Hyper-V: the reconcile actions and every script, in order.
#[derive(Debug)]
pub struct HvDryRun {
    pub lab: String,
    pub actions: Vec<Action>,
    pub scripts: Vec<PsScript>,
}

/// `klab up --dry-run` on Hyper-V, for a host that has no Hyper-V objects of the lab yet (the
/// dry-run runner answers every query with "nothing there").
pub fn dry_run_up(
    lab: &Lab,
    inputs: &PlanInputs,
    templates: Arc<Templates>,
) -> Result<HvDryRun, Error> {
    let plan = crate::plan::plan(lab, inputs);
    let rendered = crate::render::render_lab(&plan, None, &templates)
        .map_err(|e| Error::Internal(super::chain(&e)))?;
    let dry = Arc::new(DryRunRunner::new());
    let layout = HvLayout::default();
    let hv = HvLab::from_plan(&plan, &layout);
    let backend = HyperVBackend::new(dry.clone(), templates, layout, Some(hv));
    let internal = |e: BackendError| Error::Internal(super::chain(&e));
    let problems = backend.preflight(true).map_err(internal)?;
    if !problems.is_empty() {
        return Err(Error::Internal(format!(
            "the dry-run runner reported host problems: {problems:?}"
        )));
    }
    let observed = backend.observe(&plan.prefix).map_err(internal)?;
    let actions = crate::reconcile::plan_up(&UpInput {
        desired: &plan,
        previous: None,
        observed: &observed,
        recreate: &BTreeSet::new(),
        journal: None,
        seed_hashes: &BTreeMap::new(),
    })
    .map_err(|refusals| {
        Error::user(
            refusals
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
            "the lab cannot be brought up as it is",
        )
    })?
    .actions;
    apply(&backend, &plan, &rendered, &actions).map_err(internal)?;
    Ok(HvDryRun {
        lab: plan.lab.clone(),
        actions,
        scripts: dry.scripts(),
    })
}

/// A real `up` on Hyper-V: the backend is reached (Windows or WSL2) and its rights checked, then
/// klab stops with the reason — nothing on the host has changed.
pub fn refuse_real_up(lab: &Lab, templates: Arc<Templates>) -> Error {
    match HyperVBackend::connect(None, templates, HvLayout::default(), scratch_dir()) {
        Err(e) => Error::user(
            format!(
                "lab {} asks for Hyper-V ([host] backend = \"hyperv\"): {}",
                lab.name,
                super::chain(&e)
            ),
            "`klab up FILE --dry-run` prints every PowerShell script klab would run, on any host; to run this lab on libvirt here, remove `backend = \"hyperv\"` from [host]",
        ),
        Ok(_) => Error::user(
            format!(
                "lab {}: klab can reach Hyper-V here, but this version only previews a Hyper-V `up` (the SSH, cloud-init and provisioning steps after boot are not driven through Hyper-V yet); nothing was changed",
                lab.name
            ),
            "`klab up FILE --dry-run` prints every PowerShell script of the up; run them yourself, or use libvirt (remove `backend = \"hyperv\"` from [host])",
        ),
    }
}

/// `klab doctor -f LAB` for a Hyper-V lab: Hyper-V reachable (Windows or WSL2), the rights the lab
/// needs, and from WSL2 whether the host can reach the lab's Internal switches. `(check, ok, detail)`.
pub fn host_checks(
    lab: &Lab,
    inputs: &PlanInputs,
    templates: Arc<Templates>,
) -> Vec<(String, bool, String)> {
    use crate::backend::hyperv::runner::{Host, detect_host};
    let plan = crate::plan::plan(lab, inputs);
    let layout = HvLayout::default();
    let hv = HvLab::from_plan(&plan, &layout);
    let mut out = Vec::new();
    let backend = match HyperVBackend::connect(Some(&plan), templates, layout, scratch_dir()) {
        Ok(b) => {
            out.push(("hyper-v".into(), true, "powershell.exe reachable".into()));
            b
        }
        Err(e) => {
            out.push((
                "hyper-v".into(),
                false,
                format!(
                    "{} — run klab on Windows or from WSL2 (`klab up FILE --dry-run` previews the scripts on any host)",
                    super::chain(&e)
                ),
            ));
            return out;
        }
    };
    // Internal switches get a host address (the gateway), and nat a NetNat: both need elevation.
    let host_network = hv.switches.iter().any(|s| s.host_ip.is_some());
    let problems = |what: &str,
                    r: Result<Vec<crate::backend::hyperv::checks::Problem>, BackendError>|
     -> Vec<(String, bool, String)> {
        match r {
            Ok(p) if p.is_empty() => vec![(what.into(), true, "fine for this lab".into())],
            Ok(p) => p
                .into_iter()
                .map(|p| (what.into(), false, format!("{} — {}", p.problem, p.fix)))
                .collect(),
            Err(e) => vec![(what.into(), false, super::chain(&e))],
        }
    };
    out.extend(problems("rights", backend.preflight(host_network)));
    if detect_host() == Host::Wsl2 {
        let internal: Vec<String> = hv
            .switches
            .iter()
            .filter(|s| s.host_ip.is_some())
            .map(|s| s.name.clone())
            .collect();
        out.extend(problems("wsl2 routing", backend.wsl_forwarding(&internal)));
    }
    out
}

/// Where `-File` scripts go when a script is too long for `-EncodedCommand`.
fn scratch_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("klab-hyperv")
}

/// Reconcile actions applied to a backend alone (what the executor does, minus the waits for a
/// node to boot and answer, which need SSH).
pub fn apply(
    backend: &dyn Backend,
    plan: &LabPlan,
    rendered: &RenderedLab,
    actions: &[Action],
) -> Result<(), BackendError> {
    let node_files = |node: &str| {
        let spec = plan.node(node);
        let files = rendered.nodes.iter().find(|n| n.name == node);
        spec.zip(files)
            .ok_or_else(|| BackendError::Other(format!("node {node} is not in the plan")))
    };
    for a in actions {
        match a {
            Action::CreatePool { pool } => {
                let xml = rendered.pool.clone().unwrap_or_default();
                backend.ensure_pool(pool, &xml, &plan.lab)?;
            }
            Action::CreateNetwork { network } | Action::StartNetwork { network } => {
                let xml = rendered
                    .networks
                    .iter()
                    .find(|(n, _)| n == network)
                    .map(|(_, x)| x.as_str())
                    .ok_or_else(|| {
                        BackendError::Other(format!("network {network} is not in the plan"))
                    })?;
                backend.ensure_network(network, xml)?;
            }
            Action::CreateNode { node } => {
                let (spec, files) = node_files(node)?;
                backend.create_volume(&plan.pool.name, &files.overlay_xml)?;
                let seed = crate::seed::build_vfat_seed(&[
                    ("meta-data", files.seed.meta_data.as_bytes()),
                    ("user-data", files.seed.user_data.as_bytes()),
                    ("network-config", files.seed.network_config.as_bytes()),
                ])
                .map_err(|e| BackendError::Other(format!("building the seed image: {e}")))?;
                backend.upload_volume(&plan.pool.name, &spec.seed.name, &seed)?;
                backend.define_and_start(&spec.domain, &files.domain_xml)?;
            }
            Action::StartNode { node } => backend.start_domain(&node_files(node)?.0.domain)?,
            Action::RestartNode { node, .. } => {
                let domain = &node_files(node)?.0.domain;
                backend.stop_domain(domain)?;
                backend.start_domain(domain)?;
            }
            Action::WaitNode { .. } => {}
            Action::RemoveDomain { domain, .. } => backend.remove_domain(domain)?,
            Action::RemoveVolume { pool, volume } => backend.remove_volume(pool, volume)?,
            Action::RemoveNetwork { network } => backend.remove_network(network)?,
            Action::RemovePool { pool } => backend.remove_pool(pool)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_lab() -> Lab {
        crate::config::parse_str(
            include_str!("../../labs/seed-000-hyperv.toml"),
            "labs/seed-000-hyperv.toml",
        )
        .unwrap()
    }

    #[test]
    fn dry_run_records_every_create_and_changes_nothing() {
        let lab = seed_lab();
        let inputs = crate::plan::fixtures::inputs(&lab.name);
        let t = Arc::new(Templates::builtin().unwrap());
        let out = dry_run_up(&lab, &inputs, t).unwrap();
        let keys: Vec<String> = out.scripts.iter().map(|s| s.key()).collect();
        assert_eq!(keys[0], "preflight host");
        assert_eq!(keys[1], "observe klab-seed000hv");
        for node in ["alma1", "alma-w1", "alma-w2"] {
            assert!(
                keys.contains(&format!("new-vm klab-seed000hv-{node}")),
                "{keys:?}"
            );
        }
        assert!(keys.contains(&"ensure-switch klab-seed000hv-outside".to_string()));
        // Nothing that removes or stops anything.
        assert!(
            keys.iter()
                .all(|k| !k.starts_with("remove-") && !k.starts_with("stop-")),
            "{keys:?}"
        );
        assert!(
            out.actions
                .iter()
                .any(|a| matches!(a, Action::CreateNode { node } if node == "alma1"))
        );
    }

    #[test]
    fn doctor_on_plain_linux_names_what_hyperv_needs_and_stops_there() {
        if crate::backend::hyperv::PowerShellRunner::detect(std::env::temp_dir()).is_some() {
            return; // Windows/WSL2: the checks ask the real host; nothing fixed to assert here.
        }
        let lab = seed_lab();
        let checks = host_checks(
            &lab,
            &crate::plan::fixtures::inputs(&lab.name),
            Arc::new(Templates::builtin().unwrap()),
        );
        assert_eq!(checks.len(), 1, "{checks:?}");
        assert_eq!(checks[0].0, "hyper-v");
        assert!(!checks[0].1);
        assert!(checks[0].2.contains("Windows or WSL2"), "{checks:?}");
    }

    #[test]
    fn a_real_up_on_plain_linux_says_hyperv_needs_windows_and_how_to_preview() {
        if crate::backend::hyperv::PowerShellRunner::detect(std::env::temp_dir()).is_some() {
            // This host is Windows or WSL2: the other refusal applies, tested by its text below.
            let e = refuse_real_up(&seed_lab(), Arc::new(Templates::builtin().unwrap()));
            assert!(e.to_string().contains("only previews"), "{e}");
            return;
        }
        let e = refuse_real_up(&seed_lab(), Arc::new(Templates::builtin().unwrap()));
        let text = e.to_string();
        assert!(text.contains("asks for Hyper-V"), "{text}");
        assert!(text.contains("Windows or WSL2"), "{text}");
        assert!(e.hint().unwrap_or_default().contains("--dry-run"));
    }
}
