//! `up`: validate against the host, plan, reconcile against what exists and the lab's journal,
//! create what is missing, and wait for every node that is not verified with its current seed
//! (pinned SSH, cloud-init, verified addresses).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::host::HostFs;
use super::{Env, Error, chain, choose_accel, is_local_system_uri};
use crate::exec::{self, JournalHandle, NodeReport, UpContext};
use crate::model::{Accel, Lab};
use crate::plan::{LabPlan, PlanInputs};
use crate::reconcile::journal::Journal;
use crate::reconcile::{self, Drift, UpActions, UpInput};
use crate::render::{RenderedLab, Templates};
use crate::state::{LabMeta, STATE_VERSION, StateDir};

pub struct UpRequest {
    pub lab: Lab,
    /// The lab file, recorded in the state for later commands.
    pub lab_file: Option<PathBuf>,
    pub uri: String,
    /// What the user asked for (`auto` is resolved against the hypervisor).
    pub accel: Accel,
    pub templates: Templates,
    pub dry_run: bool,
    pub recreate: BTreeSet<String>,
    pub jobs: usize,
    pub host: HostFs,
    /// Build the Kubernetes cluster after the VMs (labs with `[kubernetes]`); `false` stops after
    /// the VMs (`--no-kubernetes`).
    pub kubernetes: bool,
    /// Download a Calico release klab has no pinned digest for.
    pub allow_unpinned: bool,
    /// `--copy NAME`: bring up this copy of the lab (`<lab>-<NAME>`, its own subnets).
    pub copy: Option<String>,
    /// The pool copies take subnets from (`KLAB_SUBNET_POOL`, else `[host] subnet-pool`, else
    /// [`crate::copies::DEFAULT_POOL`]).
    pub subnet_pool: Option<ipnetwork::Ipv4Network>,
}

#[derive(Debug)]
pub enum UpOutcome {
    DryRun {
        plan: Box<LabPlan>,
        todo: UpActions,
    },
    Done {
        plan: Box<LabPlan>,
        accel: Accel,
        /// False when nothing had to be done.
        changed: bool,
        reports: Vec<NodeReport>,
        drift: Vec<Drift>,
        /// What the provisioner did (labs with `[kubernetes]`, unless turned off).
        kubernetes: Option<super::provision::ProvisionOutcome>,
    },
}

/// sha256 (hex) of a node's seed files: what the journal records and compares.
pub fn seed_hashes(rendered: &RenderedLab) -> BTreeMap<String, String> {
    rendered
        .nodes
        .iter()
        .map(|n| {
            let mut h = Sha256::new();
            for part in [&n.seed.meta_data, &n.seed.user_data, &n.seed.network_config] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
            (n.name.clone(), hex(&h.finalize()))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn up(env: &Env, mut req: UpRequest) -> Result<UpOutcome, Error> {
    // The lab's name first (a copy's follows from the copy name), so the registry is only changed
    // under the lab's lock: a failed `up` can then tell whether the entry is its own to release.
    let name = match &req.copy {
        Some(copy) if !crate::copies::is_copy_name(copy) => {
            let e = crate::copies::CopyError::BadName(copy.clone());
            return Err(Error::user(e.to_string(), e.hint()));
        }
        Some(copy) => crate::copies::copy_lab_name(&req.lab.name, copy),
        None => req.lab.name.clone(),
    };
    let state = env.paths.state(&name);
    let _lock = if req.dry_run {
        if state.is_locked() {
            return Err(Error::user(
                format!(
                    "lab `{name}` is busy: another klab command is changing it, so a dry run cannot say what `up` would do"
                ),
                "run the dry run again when the other command has finished",
            ));
        }
        None
    } else {
        Some(state.lock()?)
    };
    let registered_before = req.dry_run || {
        let registry = crate::registry::Registry::new(&env.paths.data_root);
        let n = name.clone();
        // A registry that cannot be read counts as holding the entry: nothing is released then.
        super::blocking(move || Ok(registry.read().map_or(true, |e| e.labs.contains_key(&n))))
            .await?
    };
    let result = match req.copy.clone() {
        Some(copy) => {
            // The registry's lock may wait for another klab: off the async runtime.
            let (data_root, checks) = (env.paths.data_root.clone(), env.host_checks);
            let (lab, pool, host, dry) = (
                req.lab.clone(),
                req.subnet_pool,
                req.host.clone(),
                req.dry_run,
            );
            super::blocking(move || derive_copy(&data_root, checks, &lab, pool, &host, &copy, dry))
                .await
        }
        None => Ok(req.lab.clone()),
    };
    let result = match result {
        Ok(lab) => {
            req.lab = lab;
            run(env, &req, &state).await
        }
        Err(e) => Err(e),
    };
    match result {
        Err(e) if !req.dry_run => {
            Err(after_failure(env, &state, &name, registered_before, e).await)
        }
        other => other,
    }
}

/// A failed `up`: a lab that got nothing (no `meta.json`: it is written before the first object)
/// leaves no state directory and, when this run registered its subnets, no registry entry. One
/// that got objects keeps its entry until `klab down` removes the objects, and the hint says so.
async fn after_failure(
    env: &Env,
    state: &StateDir,
    name: &str,
    registered_before: bool,
    e: Error,
) -> Error {
    if let Err(e) = state.remove_if_unused() {
        tracing::warn!("{}", chain(&e));
    }
    if registered_before {
        return e;
    }
    if !state.path().join("meta.json").exists() {
        let registry = crate::registry::Registry::new(&env.paths.data_root);
        let n = name.to_string();
        let released = super::blocking(move || {
            let mut g = registry.lock().map_err(registry_err)?;
            if g.entries.labs.remove(&n).is_some() {
                g.save().map_err(registry_err)?;
            }
            Ok(())
        })
        .await;
        if let Err(r) = released {
            env.printer.note(format!(
                "warning: lab {name}: its subnets stay registered on this host: {r}"
            ));
        }
        return e;
    }
    match e {
        Error::User { message, hint } => Error::User {
            message,
            hint: Some(format!(
                "{}; its subnets stay reserved on this host until `klab down {name}` removes it",
                hint.unwrap_or_else(|| "fix the cause and run `klab up` again".into())
            )),
        },
        other => other,
    }
}

async fn run(env: &Env, req: &UpRequest, state: &StateDir) -> Result<UpOutcome, Error> {
    let lab = &req.lab;
    let uri = req.uri.as_str();
    let p = &env.printer;
    let backend = env.connect(uri).await?;
    let support = exec::call_within(&backend, "read capabilities", env.call_timeout, |b| {
        b.accel_support()
    })
    .await
    .map_err(|e| Error::user(chain(&e), "run `klab doctor` to check the host"))?;
    let accel = choose_accel(req.accel, support)?;
    p.note(format!(
        "lab {}: {} nodes on {uri}, accelerator {} ({})",
        lab.name,
        lab.nodes.len(),
        accel.as_str(),
        match (accel, req.accel) {
            (Accel::Kvm, Accel::Auto) => "auto: libvirt offers KVM",
            (Accel::Qemu, Accel::Auto) => "auto: libvirt offers no KVM, using TCG",
            (Accel::Qemu, _) => "TCG, as requested",
            _ => "as requested",
        }
    ));

    let node_names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    let keys = if req.dry_run && !state.exists() {
        None
    } else {
        Some(state.ensure_keys(&node_names, crate::keys::generate_ed25519)?)
    };
    let local_images = env.images.local_images().map_err(Error::Internal)?;
    let inputs = PlanInputs {
        accel,
        uri: uri.to_string(),
        pool_dir: env.paths.pool_dir(&lab.name).display().to_string(),
        image_cache: env.images.cache_root().display().to_string(),
        console_dir: env.paths.console_dir().display().to_string(),
        keys: keys.clone(),
        local_images,
    };
    let plan = crate::plan::plan(lab, &inputs);
    if env.host_checks {
        let others: Vec<LabPlan> = crate::state::list_labs(&env.paths.state_root)
            .unwrap_or_default()
            .iter()
            .filter(|l| **l != lab.name)
            .filter_map(|l| env.paths.state(l).load_plan().ok().flatten())
            .collect();
        let mut vip_problems: Vec<String> = super::host::vip_conflicts(&plan, &others)
            .into_iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, m)| m)
            .collect();
        // Probes with a connect timeout: off the async runtime.
        let (host, probe_plan) = (req.host.clone(), plan.clone());
        if let Some(Err(m)) = super::blocking(move || Ok(host.vip_answers(&probe_plan))).await? {
            vip_problems.push(m);
        }
        if !vip_problems.is_empty() {
            return Err(Error::user(
                format!(
                    "the lab's API VIP is not free:\n  {}",
                    vip_problems.join("\n  ")
                ),
                "choose another control-plane-vip (or rename the lab); `klab doctor -f <lab file>` shows the checks",
            ));
        }
        req.host
            .preflight(&plan, is_local_system_uri(uri))
            .map_err(|problems| {
                Error::user(
                    format!(
                        "the host is not ready for this lab:\n  {}",
                        problems.join("\n  ")
                    ),
                    "fix the items above (change the lab's CIDRs or bridge names), or run `klab doctor -f <lab file>` for details",
                )
            })?;
    }
    if !req.dry_run {
        let (data_root, claimed) = (env.paths.data_root.clone(), lab.clone());
        super::blocking(move || claim_subnets(&data_root, &claimed)).await?;
    }
    // A saved plan or journal this klab cannot read only costs the change check, never the lab:
    // without a journal every running node is waited for and verified again.
    let previous: Option<LabPlan> = state.load_plan().unwrap_or_else(|e| {
        tracing::warn!(
            "{}; not checking for changes that need a rebuild",
            chain(&e)
        );
        None
    });
    let journal: Option<Journal> = state.load_journal().unwrap_or_else(|e| {
        tracing::warn!("{}; verifying every node again", chain(&e));
        None
    });
    let rendered = crate::render::render_lab(&plan, keys.as_ref(), &req.templates)
        .map_err(|e| Error::user(chain(&e), "check your template overrides"))?;
    let hashes = seed_hashes(&rendered);
    let prefix = plan.prefix.clone();
    let observed = env
        .call(&backend, format!("list objects {prefix}*"), move |b| {
            b.observe(&prefix)
        })
        .await?;
    let todo = reconcile::plan_up(&UpInput {
        desired: &plan,
        previous: previous.as_ref(),
        observed: &observed,
        recreate: &req.recreate,
        journal: journal.as_ref(),
        seed_hashes: &hashes,
    })
    .map_err(Error::Refused)?;
    for d in &todo.drift {
        p.note(format!("warning: {d}"));
    }

    if req.dry_run {
        return Ok(UpOutcome::DryRun {
            plan: Box::new(plan),
            todo,
        });
    }
    let keys = keys.ok_or_else(|| Error::Internal("keys missing".into()))?;

    // Record what we are about to make before making it: a crash leaves a lab `klab down` can find.
    state.save_meta(&LabMeta {
        version: STATE_VERSION,
        lab: lab.name.clone(),
        uri: uri.to_string(),
        accel: accel.as_str().to_string(),
        source: req
            .lab_file
            .as_ref()
            .and_then(|f| std::fs::canonicalize(f).ok())
            .map(|p| p.display().to_string()),
        klab_version: env!("CARGO_PKG_VERSION").to_string(),
    })?;

    let host_keys: BTreeMap<String, String> = keys
        .host_keys
        .iter()
        .map(|(n, k)| (n.clone(), k.public_openssh.clone()))
        .collect();
    let route_check = super::route_check(env, uri, &req.host);
    let journal = Arc::new(JournalHandle::new(
        Some(state.clone()),
        journal
            .filter(|j| j.lab == lab.name)
            .unwrap_or_else(|| Journal::new(&lab.name)),
    ));
    let user_private_key = state.user_private_key()?;

    let (vms_changed, reports) = if todo.is_noop() {
        state.save_plan(&plan)?;
        write_access_files(state, &plan, &keys)?;
        (false, Vec::new())
    } else {
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
            let images = Arc::clone(&env.images);
            let quiet = p.is_json();
            tokio::task::spawn_blocking(move || images.ensure(&spec, quiet))
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(|e| {
                    Error::user(
                        e,
                        "run `klab image build debian-12` for an offline image, or set `path = …` in [images.<name>]",
                    )
                })?;
        }
        let console_dir = env.paths.console_dir();
        std::fs::create_dir_all(&console_dir).map_err(|e| {
            Error::Internal(format!("cannot create {}: {e}", console_dir.display()))
        })?;

        state.save_plan(&plan)?;
        let ctx = UpContext {
            backend: Arc::clone(&backend),
            plan: Arc::new(plan.clone()),
            rendered: Arc::new(rendered),
            user_private_key: Arc::new(user_private_key.clone()),
            host_keys: Arc::new(host_keys.clone()),
            timeouts: lab.timeouts.clone(),
            printer: p.clone(),
            jobs: req.jobs,
            dialer: Arc::clone(&env.dialer),
            journal: Arc::clone(&journal),
            seed_hashes: Arc::new(hashes),
            route_check: route_check.clone(),
            call_timeout: env.call_timeout,
            // The console log is a file on this host only for a local hypervisor.
            follow_console: env.host_checks && uri.starts_with("qemu:///"),
        };
        write_access_files(state, &plan, &keys)?;
        // Kubernetes nodes whose VM goes (left the file, --recreate, or deleted by hand) leave the
        // cluster first.
        if req.kubernetes
            && plan.kubernetes.is_some()
            && let Some(prev) = &previous
        {
            let joined = journal.snapshot();
            let leaving: Vec<String> = todo
                .actions
                .iter()
                .filter_map(|a| match a {
                    reconcile::Action::RemoveDomain { domain, .. } => prev
                        .nodes
                        .iter()
                        .find(|n| &n.domain == domain)
                        .map(|n| n.name.clone()),
                    // A member whose VM vanished comes back from a clean disk under the same name: its
                    // old Node object must go first, or its join is refused.
                    reconcile::Action::CreateNode { node } => Some(node.clone()),
                    _ => None,
                })
                .collect::<BTreeSet<String>>()
                .into_iter()
                .filter(|n| {
                    joined.nodes.get(n).is_some_and(|r| {
                        ["kubeadm-init", "join-workers", "join-control-plane"]
                            .iter()
                            .any(|ph| r.phases.get(*ph).is_some_and(|p| p.status == "done"))
                    })
                })
                .collect();
            if !leaving.is_empty() {
                // A node that left the file still has its pinned key in the state directory.
                let mut pins = host_keys.clone();
                for n in &leaving {
                    if !pins.contains_key(n)
                        && let Some(key) = state.pinned_host_key(n)
                    {
                        pins.insert(n.clone(), key);
                    }
                }
                for note in super::provision::leave_cluster(
                    env,
                    prev,
                    &plan,
                    &leaving,
                    &user_private_key,
                    &pins,
                    &lab.timeouts,
                )
                .await?
                {
                    p.note(format!("warning: {note}"));
                }
            }
        }
        // A node created now starts from a clean disk: none of its provisioning is in place.
        for a in &todo.actions {
            if let reconcile::Action::CreateNode { node } = a {
                journal
                    .update(|j| j.forget(node))
                    .map_err(|e| Error::Internal(chain(&e)))?;
            }
        }
        let reports = exec::apply_up(&ctx, &todo.actions).await.map_err(|e| {
            Error::user(
                format!("lab {} is not up:\n{}", plan.lab, chain(&e)),
                format!(
                    "fix the cause and run `klab up` again (it continues where it stopped), or remove the lab with `klab down {}`",
                    plan.lab
                ),
            )
        })?;
        (true, reports)
    };
    // The cluster, once every node is verified; also on a rerun that changed no VM (a killed
    // provisioning resumes).
    let kubernetes = provision(
        env,
        req,
        state,
        &plan,
        &journal,
        &user_private_key,
        &host_keys,
        route_check,
    )
    .await?;
    let changed = vms_changed || kubernetes.as_ref().is_some_and(|k| k.changed);
    Ok(UpOutcome::Done {
        plan: Box::new(plan),
        accel,
        changed,
        reports,
        drift: todo.drift,
        kubernetes,
    })
}

fn registry_err(e: crate::registry::RegistryError) -> Error {
    Error::user(
        chain(&e),
        "wait for the other klab; a damaged registry.json can be removed (the next `klab up` of each lab registers it again)",
    )
}

/// `base` as copy `copy`: its subnets from the registry when it has them (stable), else new
/// ones from the pool clear of every other lab's, the host's routes and the lab's pod/service
/// ranges; claimed at once, so copies brought up together never pick the same subnet.
fn derive_copy(
    data_root: &std::path::Path,
    host_checks: bool,
    base: &Lab,
    subnet_pool: Option<ipnetwork::Ipv4Network>,
    host: &HostFs,
    copy: &str,
    dry_run: bool,
) -> Result<Lab, Error> {
    let pool = subnet_pool.or(base.host.subnet_pool).unwrap_or_else(|| {
        crate::copies::DEFAULT_POOL
            .parse()
            .expect("the default pool is a CIDR")
    });
    let name = crate::copies::copy_lab_name(&base.name, copy);
    let registry = crate::registry::Registry::new(data_root);
    let mut g = registry.lock().map_err(registry_err)?;
    let previous = g.entries.labs.get(&name).map(|e| e.networks.clone());
    let mut taken = g.entries.taken_by_others(&name);
    if host_checks {
        taken.extend(
            host.routes()
                .into_iter()
                .filter(|r| r.net.prefix() > 0)
                .map(|r| r.net)
                .filter(|n| !previous.iter().flatten().any(|(_, p)| p == n)),
        );
    }
    let lab = crate::copies::derive(base, copy, pool, &taken, previous.as_deref())
        .map_err(|e| Error::user(e.to_string(), e.hint()))?;
    if dry_run {
        return Ok(lab);
    }
    g.entries.labs.insert(
        lab.name.clone(),
        crate::registry::Entry {
            networks: crate::copies::subnets(&lab),
            copy_of: Some(base.name.clone()),
            copy: Some(copy.to_string()),
        },
    );
    g.save().map_err(registry_err)?;
    Ok(lab)
}

/// Records the lab's subnets host-wide, refusing (with both names) one another lab uses.
fn claim_subnets(data_root: &std::path::Path, lab: &Lab) -> Result<(), Error> {
    let registry = crate::registry::Registry::new(data_root);
    let mut g = registry.lock().map_err(registry_err)?;
    let mine = crate::copies::subnets(lab);
    let conflicts = g.entries.conflicts(&lab.name, &mine);
    if !conflicts.is_empty() {
        return Err(Error::user(
            format!(
                "the lab's networks are in use on this host:\n  {}",
                conflicts.join("\n  ")
            ),
            "change the lab's CIDRs, remove the other lab (`klab down NAME`), or run a copy (`klab up --copy NAME`) that gets its own subnets",
        ));
    }
    let entry = g
        .entries
        .labs
        .entry(lab.name.clone())
        .or_insert_with(|| crate::registry::Entry {
            networks: Vec::new(),
            copy_of: None,
            copy: None,
        });
    if entry.networks != mine {
        entry.networks = mine;
        g.save().map_err(registry_err)?;
    }
    Ok(())
}

/// The provisioner, once every node is verified (labs with `[kubernetes]`).
#[allow(clippy::too_many_arguments)]
async fn provision(
    env: &Env,
    req: &UpRequest,
    state: &StateDir,
    plan: &LabPlan,
    journal: &Arc<JournalHandle>,
    user_private_key: &str,
    host_keys: &BTreeMap<String, String>,
    route_check: Option<exec::RouteCheck>,
) -> Result<Option<super::provision::ProvisionOutcome>, Error> {
    if !req.kubernetes || plan.kubernetes.is_none() {
        return Ok(None);
    }
    super::provision::provision(
        env,
        state,
        super::provision::ProvisionInput {
            plan,
            templates: &req.templates,
            timeouts: &req.lab.timeouts,
            journal: Arc::clone(journal),
            user_private_key,
            host_keys,
            from: None,
            only: None,
            allow_unpinned_calico: req.allow_unpinned,
            route_check,
            jobs: req.jobs,
        },
    )
    .await
}

fn write_access_files(
    state: &StateDir,
    plan: &LabPlan,
    keys: &crate::plan::KeyMaterial,
) -> Result<(), Error> {
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
