//! `klab up`: validate, plan, reconcile against what exists, create what is missing, wait for
//! every node (pinned SSH, cloud-init, verified addresses), then say how to reach the lab.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::json;

use super::{CmdError, chain, load_lab, requested_accel, resolve_uri, templates};
use crate::backend::Backend;
use crate::cli::{GlobalArgs, UpArgs};
use crate::exec::{self, UpContext, call};
use crate::model::Accel;
use crate::output::Printer;
use crate::plan::{LabPlan, PlanInputs};
use crate::reconcile::{self, UpInput};
use crate::state::{LabMeta, StateDir};

pub async fn up(p: &Printer, g: &GlobalArgs, args: &UpArgs) -> Result<(), CmdError> {
    let lab = load_lab(&args.file)?;
    let uri = resolve_uri(g, Some(&lab));
    let templates = templates(g)?;
    let state = StateDir::new(&crate::paths::state_root(), &lab.name);
    let _lock = if args.dry_run {
        None
    } else {
        Some(state.lock()?)
    };

    let backend = connect(&uri).await?;
    let support = call(&backend, |b| b.accel_support())
        .await
        .map_err(|e| CmdError::user(chain(&e), "run `klab doctor` to check the host"))?;
    let accel = choose_accel(requested_accel(g, Some(&lab)), support)?;
    p.note(format!(
        "lab {}: {} nodes on {uri}, accelerator {} ({})",
        lab.name,
        lab.nodes.len(),
        accel.as_str(),
        match (accel, requested_accel(g, Some(&lab))) {
            (Accel::Kvm, Accel::Auto) => "auto: libvirt offers KVM",
            (Accel::Qemu, Accel::Auto) => "auto: libvirt offers no KVM, using TCG",
            (Accel::Qemu, _) => "TCG, as requested",
            _ => "as requested",
        }
    ));

    let node_names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    let keys = if args.dry_run && !state.exists() {
        None
    } else {
        Some(state.ensure_keys(&node_names, crate::keys::generate_ed25519)?)
    };
    let cache = crate::image::ImageCache::new(crate::paths::image_cache());
    let local_images = cache
        .local_images()
        .map_err(|e| CmdError::Internal(chain(&e)))?;
    let inputs = PlanInputs {
        accel,
        uri: uri.clone(),
        pool_dir: crate::paths::pool_dir(&lab.name).display().to_string(),
        image_cache: cache.root().display().to_string(),
        console_dir: crate::paths::console_dir().display().to_string(),
        keys: keys.clone(),
        local_images,
    };
    let plan = crate::plan::plan(&lab, &inputs);
    crate::commands::doctor::preflight_plan(&plan).map_err(|problems| {
        CmdError::user(
            format!("the host is not ready for this lab:\n  {}", problems.join("\n  ")),
            "change the lab's CIDRs or bridge names, or run `klab doctor -f <lab file>` for details",
        )
    })?;
    // A saved plan this klab cannot read only costs the change check, never the lab.
    let previous: Option<LabPlan> = state.load_plan().unwrap_or_else(|e| {
        tracing::warn!(
            "{}; not checking for changes that need a rebuild",
            chain(&e)
        );
        None
    });
    let prefix = plan.prefix.clone();
    let observed = call(&backend, move |b| b.observe(&prefix))
        .await
        .map_err(|e| CmdError::Internal(chain(&e)))?;
    let recreate: BTreeSet<String> = args.recreate.iter().cloned().collect();
    let todo = reconcile::plan_up(&UpInput {
        desired: &plan,
        previous: previous.as_ref(),
        observed: &observed,
        recreate: &recreate,
    })
    .map_err(CmdError::Refused)?;

    if args.dry_run {
        if p.is_json() {
            p.json(&json!({ "lab": plan.lab, "dry_run": true, "actions": todo.actions, "unchanged": todo.unchanged }));
        } else if todo.is_noop() {
            p.line(format!("lab {} is up to date; nothing to do", plan.lab));
        } else {
            p.line(format!("klab up would, for lab {}:", plan.lab));
            for a in &todo.actions {
                p.line(format!("  {}", a.describe()));
            }
        }
        return Ok(());
    }
    let keys = keys.ok_or_else(|| CmdError::Internal("keys missing".into()))?;

    // Record what we are about to make before making it: a crash leaves a lab `klab down` can find.
    state.save_meta(&LabMeta {
        lab: lab.name.clone(),
        uri: uri.clone(),
        accel: accel.as_str().to_string(),
        source: std::fs::canonicalize(&args.file)
            .ok()
            .map(|p| p.display().to_string()),
        klab_version: env!("CARGO_PKG_VERSION").to_string(),
    })?;

    if todo.is_noop() {
        state.save_plan(&plan)?;
        write_access_files(&state, &plan, &keys)?;
        report(p, &plan, &[], true, accel);
        return Ok(());
    }

    // Base images for the nodes we create: fetched/verified before anything is created.
    let creating: BTreeSet<&str> = todo
        .actions
        .iter()
        .filter_map(|a| match a {
            reconcile::Action::CreateNode { node } => Some(node.as_str()),
            _ => None,
        })
        .collect();
    let needed: BTreeSet<&str> = plan
        .nodes
        .iter()
        .filter(|n| creating.contains(n.name.as_str()))
        .map(|n| n.image.as_str())
        .collect();
    for img in plan
        .images
        .iter()
        .filter(|i| needed.contains(i.key.as_str()))
    {
        let spec = img.clone();
        let cache = cache.clone();
        let json = p.is_json();
        tokio::task::spawn_blocking(move || {
            if json {
                cache.ensure(&spec, &crate::image::NoProgress)
            } else {
                cache.ensure(&spec, &crate::image::BarProgress::new())
            }
        })
            .await
            .map_err(|e| CmdError::Internal(e.to_string()))?
            .map_err(|e| {
                CmdError::user(
                    chain(&e),
                    "run `klab image build debian-12` for an offline image, or set `path = …` in [images.<name>]",
                )
            })?;
    }
    std::fs::create_dir_all(crate::paths::console_dir()).map_err(|e| {
        CmdError::Internal(format!(
            "cannot create {}: {e}",
            crate::paths::console_dir().display()
        ))
    })?;

    state.save_plan(&plan)?;
    let rendered = crate::render::render_lab(&plan, Some(&keys), &templates)
        .map_err(|e| CmdError::user(chain(&e), "check your template overrides"))?;
    let host_keys: BTreeMap<String, String> = keys
        .host_keys
        .iter()
        .map(|(n, k)| (n.clone(), k.public_openssh.clone()))
        .collect();
    let ctx = UpContext {
        backend: Arc::clone(&backend),
        plan: Arc::new(plan.clone()),
        rendered: Arc::new(rendered),
        user_private_key: Arc::new(state.user_private_key()?),
        host_keys: Arc::new(host_keys),
        timeouts: lab.timeouts.clone(),
        printer: p.clone(),
        jobs: args.jobs,
    };
    write_access_files(&state, &plan, &keys)?;
    match exec::apply_up(&ctx, &todo.actions).await {
        Ok(reports) => {
            report(p, &plan, &reports, false, accel);
            Ok(())
        }
        Err(e) => Err(CmdError::user(
            format!("lab {} is not up:\n{}", plan.lab, chain(&e)),
            format!(
                "fix the cause and run `klab up` again (it continues where it stopped), or remove the lab with `klab down {}`",
                plan.lab
            ),
        )),
    }
}

pub async fn connect(uri: &str) -> Result<Arc<dyn Backend>, CmdError> {
    #[cfg(feature = "libvirt")]
    {
        let uri = uri.to_string();
        let b = tokio::task::spawn_blocking(move || crate::backend::libvirt::LibvirtBackend::connect(&uri))
            .await
            .map_err(|e| CmdError::Internal(e.to_string()))?
            .map_err(|e| {
                CmdError::user(
                    chain(&e),
                    "is libvirtd running and may you use it? `klab doctor` checks; choose another URI with --connect or KLAB_CONNECT",
                )
            })?;
        Ok(Arc::new(b))
    }
    #[cfg(not(feature = "libvirt"))]
    {
        Err(CmdError::user(
            format!("cannot connect to {uri}: this klab was built without the libvirt backend"),
            "build with the default features (needs libvirt-dev)",
        ))
    }
}

pub fn choose_accel(
    requested: Accel,
    support: crate::backend::AccelSupport,
) -> Result<Accel, CmdError> {
    match requested {
        Accel::Auto if support.kvm => Ok(Accel::Kvm),
        Accel::Auto | Accel::Qemu if support.qemu => Ok(Accel::Qemu),
        Accel::Kvm if support.kvm => Ok(Accel::Kvm),
        Accel::Kvm => Err(CmdError::user(
            "accelerator `kvm` was requested but libvirt offers no KVM domains on this host",
            "use `--accel qemu` (or `[host] accel = \"qemu\"`, KLAB_ACCEL=qemu) to run under TCG",
        )),
        _ => Err(CmdError::user(
            "libvirt offers neither KVM nor QEMU (TCG) x86_64 guests here",
            "install qemu-system-x86 and restart libvirtd; `klab doctor` checks",
        )),
    }
}

fn write_access_files(
    state: &StateDir,
    plan: &LabPlan,
    keys: &crate::plan::KeyMaterial,
) -> Result<(), CmdError> {
    let mut known = String::new();
    for (node, key) in &keys.host_keys {
        if let Some(n) = plan.node(node) {
            known.push_str(&crate::keys::known_hosts_line(
                &[n.ssh_address.to_string(), n.name.clone()],
                &key.public_openssh,
            ));
            known.push('\n');
        }
    }
    let kh = state.write_file("known_hosts", &known)?;
    state.write_file(
        "ssh_config",
        &crate::commands::ssh::render_ssh_config(plan, &state.user_key_path(), &kh),
    )?;
    Ok(())
}

fn report(p: &Printer, plan: &LabPlan, reports: &[exec::NodeReport], noop: bool, accel: Accel) {
    if p.is_json() {
        p.json(&json!({
            "lab": plan.lab,
            "changed": !noop,
            "kubernetes_provisioned": false,
            "accelerator": accel.as_str(),
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
            "lab {} is up to date: {} nodes running, nothing changed",
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
    if let Some(k) = &plan.kubernetes {
        p.note(format!(
            "note: this klab version builds the VMs only; the Kubernetes {} steps ({}) are planned but not run yet",
            k.version,
            plan.steps
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
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
