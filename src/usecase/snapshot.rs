//! `snapshot save|list|delete` and `reset`: a lab put back to a moment in seconds instead of
//! rebuilt. Every node of the lab is paused together, then each takes an internal snapshot of its
//! memory and disk (libvirt, in the node's qcow2 overlay), then all resume. `reset` reverts every
//! node paused, resumes them together, sets each guest clock to the host's (a cluster whose clock
//! is in the past rejects certificates), and verifies every node (and, for a provisioned Kubernetes
//! lab, that every node is Ready) before it reports success.
//!
//! The records in `snapshots.json` are never trusted alone: `list`, `reset` and `save` check them
//! against the snapshots libvirt holds for each node, so a node rebuilt from a clean disk (or a
//! snapshot removed by hand) shows as missing, with the fix, instead of failing halfway.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Env, Error, chain, find_lab};
use crate::backend::{Backend, BackendError};
use crate::observed::DomainState;
use crate::plan::{LabPlan, NodeSpec};
use crate::provision::ssh::SshTarget;
use crate::render::Templates;
use crate::state::StateDir;

/// The snapshot `klab up --snapshot` takes and `klab reset` goes back to by default.
pub const INITIAL: &str = "initial";
const RECORD_FILE: &str = "snapshots.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// Unix seconds, host clock.
    pub created_at: u64,
    pub nodes: Vec<String>,
    /// Seconds all nodes were paused while it was taken.
    #[serde(default)]
    pub paused_seconds: f64,
}

/// A snapshot record as libvirt bears it out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub info: SnapshotInfo,
    /// Nodes of the lab whose domain does not hold it (rebuilt from a clean disk since it was
    /// taken, added to the lab since, or removed by hand): the lab cannot go back to it.
    pub missing_on: Vec<String>,
}

impl Listed {
    pub fn usable(&self) -> bool {
        self.missing_on.is_empty()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Records {
    #[serde(default)]
    snapshots: Vec<SnapshotInfo>,
}

#[derive(Debug, Serialize)]
pub struct ResetOutcome {
    pub lab: String,
    pub snapshot: String,
    pub seconds: f64,
    /// Per node: how far its clock was behind the host's before klab set it (seconds).
    pub clock_behind: BTreeMap<String, f64>,
    pub kubernetes_ready: Option<bool>,
}

/// `[a-z0-9._-]`, 1–40 characters: a name libvirt and a shell take as it is.
pub fn is_snapshot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && !s.starts_with(['-', '.'])
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn check_name(name: &str) -> Result<(), Error> {
    if is_snapshot_name(name) {
        Ok(())
    } else {
        Err(Error::user(
            format!("`{}` is not a snapshot name", crate::config::escape(name)),
            "use lowercase letters, digits, `.`, `_` and `-` (at most 40), e.g. `initial` or `before-upgrade`",
        ))
    }
}

fn records(state: &StateDir) -> Records {
    state
        .read_file(RECORD_FILE)
        .ok()
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn save_records(state: &StateDir, r: &Records) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(r).map_err(|e| Error::Internal(e.to_string()))?;
    state
        .write_private_file(RECORD_FILE, text.as_bytes())
        .map(|_| ())
        .map_err(|e| Error::Internal(chain(&e)))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The snapshot records in the lab's state go (`down`, also with `--keep-state`: the domains
/// that held the snapshots are gone).
pub fn clear_records(state: &StateDir) -> Result<(), Error> {
    let path = state.path().join(RECORD_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Internal(format!(
            "cannot remove {}: {e}",
            path.display()
        ))),
    }
}

/// PURE: each record with the nodes of the plan whose domain does not hold it (`held`: the
/// snapshot names libvirt lists per node).
pub fn check_records(
    records: &[SnapshotInfo],
    plan_nodes: &[String],
    held: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Listed> {
    records
        .iter()
        .map(|info| Listed {
            info: info.clone(),
            missing_on: missing_on(plan_nodes, held, &info.name),
        })
        .collect()
}

fn missing_on(
    plan_nodes: &[String],
    held: &BTreeMap<String, BTreeSet<String>>,
    name: &str,
) -> Vec<String> {
    plan_nodes
        .iter()
        .filter(|n| !held.get(*n).is_some_and(|s| s.contains(name)))
        .cloned()
        .collect()
}

/// PURE: the records that name one of `rebuilt`: a node rebuilt from a clean disk lost its half.
pub fn stale_records(records: &[SnapshotInfo], rebuilt: &BTreeSet<String>) -> Vec<String> {
    records
        .iter()
        .filter(|s| s.nodes.iter().any(|n| rebuilt.contains(n)))
        .map(|s| s.name.clone())
        .collect()
}

fn node_names(plan: &LabPlan) -> Vec<String> {
    plan.nodes.iter().map(|n| n.name.clone()).collect()
}

/// A snapshot call's failure: a backend without snapshots is the user's to know, the rest klab's.
fn backend_err(lab: &str, uri: &str, e: BackendError) -> Error {
    match e {
        BackendError::Unsupported { .. } => Error::user(
            format!("snapshots need a libvirt QEMU hypervisor; lab {lab} runs on {uri} ({e})"),
            "snapshots are taken with libvirt's internal snapshots of the nodes' qcow2 overlays",
        ),
        other => Error::Internal(chain(&other)),
    }
}

/// The snapshot names libvirt holds for each node of the plan (what the records are checked
/// against: never the file alone).
async fn held(
    env: &Env,
    backend: &Arc<dyn Backend>,
    lab: &str,
    uri: &str,
    plan: &LabPlan,
) -> Result<BTreeMap<String, BTreeSet<String>>, Error> {
    let mut out = BTreeMap::new();
    for n in &plan.nodes {
        let d = n.domain.clone();
        let names = crate::exec::call_within(
            backend,
            format!("list snapshots of {d}"),
            env.call_timeout,
            move |b| b.list_snapshots(&d),
        )
        .await
        .map_err(|e| backend_err(lab, uri, e))?;
        out.insert(n.name.clone(), names.into_iter().collect());
    }
    Ok(out)
}

/// Resumes every domain in `nodes`, all of them also when one fails; the ones that did not resume
/// with why.
async fn resume_all(
    env: &Env,
    backend: &Arc<dyn Backend>,
    nodes: &[&NodeSpec],
) -> Vec<(String, String)> {
    let mut failed = Vec::new();
    for n in nodes {
        let d = n.domain.clone();
        if let Err(e) = env
            .call(backend, format!("resume {d}"), move |b| b.resume_domain(&d))
            .await
        {
            failed.push((n.name.clone(), e.to_string()));
        }
    }
    failed
}

fn names(nodes: &[&NodeSpec]) -> String {
    nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The lab's saved plan and a connection; every node must be running.
async fn running_lab(
    env: &Env,
    lab: &str,
    connect: Option<&str>,
) -> Result<(LabPlan, Arc<dyn Backend>, String), Error> {
    let state = env.paths.state(lab);
    let found = find_lab(env, connect, &state).await?;
    let plan = found.saved.ok_or_else(|| {
        Error::user(
            format!("lab {lab} has no saved plan on this host"),
            "`klab up LAB_FILE` builds it; `klab list` shows the labs here",
        )
    })?;
    // libvirt's other drivers (LXC, Xen) have no internal QEMU snapshots; other backends say
    // themselves that they cannot snapshot.
    if found.backend.kind() == "libvirt" && !found.uri.starts_with("qemu:") {
        return Err(Error::user(
            format!(
                "snapshots need a libvirt QEMU hypervisor; lab {lab} runs on {}",
                found.uri
            ),
            "snapshots are taken with libvirt's internal snapshots of the nodes' qcow2 overlays",
        ));
    }
    let states: BTreeMap<String, DomainState> = found
        .observed
        .domains
        .iter()
        .filter(|d| d.owner.as_ref().is_some_and(|t| t.lab == lab))
        .map(|d| (d.name.clone(), d.state))
        .collect();
    let not_running: Vec<String> = plan
        .nodes
        .iter()
        .filter(|n| states.get(&n.domain) != Some(&DomainState::Running))
        .map(|n| n.name.clone())
        .collect();
    if !not_running.is_empty() {
        return Err(Error::user(
            format!("lab {lab}: {} not running", not_running.join(", ")),
            "`klab up LAB_FILE` starts what is missing; snapshots are taken of a running lab",
        ));
    }
    Ok((plan, found.backend, found.uri))
}

/// Pauses every node together, snapshots each, resumes them all (also when a snapshot failed;
/// the ones already taken are then deleted again).
pub async fn save(
    env: &Env,
    lab: &str,
    name: &str,
    connect: Option<&str>,
    templates: &Templates,
) -> Result<SnapshotInfo, Error> {
    check_name(name)?;
    let state = env.paths.state(lab);
    let _lock = state.lock()?;
    let (plan, backend, uri) = running_lab(env, lab, connect).await?;
    let p = &env.printer;
    let held = held(env, &backend, lab, &uri, &plan).await?;
    let mut recs = records(&state);
    if recs.snapshots.iter().any(|s| s.name == name) {
        let missing = missing_on(&node_names(&plan), &held, name);
        if missing.is_empty() {
            return Err(Error::user(
                format!("lab {lab} already has a snapshot `{name}`"),
                format!(
                    "delete it first (`klab snapshot delete {lab} {name}`) or choose another name"
                ),
            ));
        }
        // A record the domains no longer bear out is no snapshot: it is replaced.
        p.note(format!(
            "lab {lab}: snapshot `{name}` is gone from {} (rebuilt since it was taken); taking it again",
            missing.join(", ")
        ));
        recs.snapshots.retain(|s| s.name != name);
        save_records(&state, &recs)?;
    }
    // What is left of a snapshot whose record went (a node of it was rebuilt): QEMU refuses a
    // name a domain already holds, and half a snapshot is of no use.
    for n in plan
        .nodes
        .iter()
        .filter(|n| held.get(&n.name).is_some_and(|s| s.contains(name)))
    {
        p.note(format!(
            "{}: removing the leftover snapshot `{name}` (no complete snapshot of the lab has that name)",
            n.name
        ));
        let (d, s) = (n.domain.clone(), name.to_string());
        env.call(&backend, format!("delete snapshot of {d}"), move |b| {
            b.delete_snapshot(&d, &s)
        })
        .await
        .map_err(|e| {
            Error::user(
                format!(
                    "lab {lab}: {}: cannot remove the leftover snapshot `{name}`: {e}",
                    n.name
                ),
                format!(
                    "`virsh snapshot-delete {} {name}` removes it by hand",
                    n.domain
                ),
            )
        })?;
    }
    let mut xmls = Vec::new();
    for n in &plan.nodes {
        let xml = templates
            .snapshot_xml(lab, &n.name, name)
            .map_err(|e| Error::user(chain(&e), "check your template overrides"))?;
        xmls.push((n.domain.clone(), xml));
    }
    let started = Instant::now();
    let mut paused = Vec::new();
    let mut taken = Vec::new();
    let mut failure = None;
    for (dom, _) in &xmls {
        let d = dom.clone();
        match env
            .call(&backend, format!("suspend {d}"), move |b| {
                b.suspend_domain(&d)
            })
            .await
        {
            Ok(()) => paused.push(dom.clone()),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        for (dom, xml) in &xmls {
            let (d, x) = (dom.clone(), xml.clone());
            p.note(format!("{dom}: saving memory and disk"));
            match env
                .call(&backend, format!("snapshot {d}"), move |b| {
                    b.create_snapshot(&d, &x)
                })
                .await
            {
                Ok(()) => taken.push(dom.clone()),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if failure.is_some() {
        for dom in &taken {
            let (d, n) = (dom.clone(), name.to_string());
            let _ = env
                .call(&backend, format!("delete snapshot of {d}"), move |b| {
                    b.delete_snapshot(&d, &n)
                })
                .await;
        }
    }
    let paused_for = started.elapsed().as_secs_f64();
    let paused_nodes: Vec<&NodeSpec> = plan
        .nodes
        .iter()
        .filter(|n| paused.contains(&n.domain))
        .collect();
    let not_resumed = resume_all(env, &backend, &paused_nodes).await;
    for (node, e) in &not_resumed {
        p.note(format!("warning: {node} is still paused: {e}"));
    }
    let still_paused = if not_resumed.is_empty() {
        String::new()
    } else {
        format!(
            "; still paused: {} (`virsh -c {uri} resume DOMAIN` resumes one)",
            not_resumed
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if let Some(e) = failure {
        return Err(Error::user(
            format!("lab {lab}: snapshot `{name}` was not taken: {e}{still_paused}"),
            "nodes built by an older klab have a writable seed disk that QEMU cannot snapshot: `klab up --recreate NODE` rebuilds them",
        ));
    }
    if !not_resumed.is_empty() {
        return Err(Error::user(
            format!("lab {lab}: snapshot `{name}` was taken{still_paused}"),
            format!("`klab reset {lab} --to {name}` also resumes every node"),
        ));
    }
    let info = SnapshotInfo {
        name: name.to_string(),
        created_at: now_secs(),
        nodes: plan.nodes.iter().map(|n| n.name.clone()).collect(),
        paused_seconds: paused_for,
    };
    recs.snapshots.push(info.clone());
    save_records(&state, &recs)?;
    Ok(info)
}

/// The lab's snapshot records, each checked against the snapshots libvirt holds for its nodes.
pub async fn list(env: &Env, lab: &str, connect: Option<&str>) -> Result<Vec<Listed>, Error> {
    let state = env.paths.state(lab);
    let recs = records(&state).snapshots;
    if recs.is_empty() {
        return Ok(Vec::new());
    }
    let found = find_lab(env, connect, &state).await?;
    let Some(plan) = &found.saved else {
        // No plan, no nodes: nothing can go back to any of them.
        return Ok(recs
            .into_iter()
            .map(|info| Listed {
                missing_on: info.nodes.clone(),
                info,
            })
            .collect());
    };
    let held = held(env, &found.backend, lab, &found.uri, plan).await?;
    Ok(check_records(&recs, &node_names(plan), &held))
}

/// After `up` rebuilt `rebuilt` from clean disks (`--recreate`, a changed definition, a domain
/// deleted by hand): the snapshots that include one of them are of no use; their records go, and
/// so do the other nodes' halves (so the name can be taken again). Returns the names dropped.
pub async fn forget_rebuilt(
    env: &Env,
    lab: &str,
    rebuilt: &BTreeSet<String>,
    connect: Option<&str>,
) -> Result<Vec<String>, Error> {
    let state = env.paths.state(lab);
    if stale_records(&records(&state).snapshots, rebuilt).is_empty() {
        return Ok(Vec::new());
    }
    let _lock = state.lock()?;
    let mut recs = records(&state);
    let stale = stale_records(&recs.snapshots, rebuilt);
    let found = find_lab(env, connect, &state).await?;
    if let Some(plan) = &found.saved {
        for n in &plan.nodes {
            for name in &stale {
                let (d, s) = (n.domain.clone(), name.clone());
                if let Err(e) = env
                    .call(
                        &found.backend,
                        format!("delete snapshot of {d}"),
                        move |b| b.delete_snapshot(&d, &s),
                    )
                    .await
                {
                    env.printer.note(format!(
                        "warning: {}: the rest of snapshot `{name}` stays: {e}",
                        n.name
                    ));
                }
            }
        }
    }
    recs.snapshots.retain(|s| !stale.contains(&s.name));
    save_records(&state, &recs)?;
    Ok(stale)
}

pub async fn delete(env: &Env, lab: &str, name: &str, connect: Option<&str>) -> Result<(), Error> {
    check_name(name)?;
    let state = env.paths.state(lab);
    let _lock = state.lock()?;
    let mut recs = records(&state);
    if !recs.snapshots.iter().any(|s| s.name == name) {
        return Err(Error::user(
            format!("lab {lab} has no snapshot `{name}`"),
            format!("`klab snapshot list {lab}` shows them"),
        ));
    }
    let found = find_lab(env, connect, &state).await?;
    if let Some(plan) = &found.saved {
        for n in &plan.nodes {
            let (d, s) = (n.domain.clone(), name.to_string());
            env.call(
                &found.backend,
                format!("delete snapshot of {d}"),
                move |b| b.delete_snapshot(&d, &s),
            )
            .await?;
        }
    }
    recs.snapshots.retain(|s| s.name != name);
    save_records(&state, &recs)
}

/// Puts every node back to snapshot `to` (default [`INITIAL`]), resumes them together, corrects
/// the clocks and verifies the lab.
pub async fn reset(
    env: &Env,
    lab: &str,
    to: Option<&str>,
    connect: Option<&str>,
    timeouts: &crate::model::Timeouts,
) -> Result<ResetOutcome, Error> {
    let name = to.unwrap_or(INITIAL);
    check_name(name)?;
    let state = env.paths.state(lab);
    let _lock = state.lock()?;
    let recs = records(&state);
    if !recs.snapshots.iter().any(|s| s.name == name) {
        let have: Vec<&str> = recs.snapshots.iter().map(|s| s.name.as_str()).collect();
        return Err(Error::user(
            format!("lab {lab} has no snapshot `{name}`"),
            if have.is_empty() {
                format!("take one with `klab snapshot save {lab}` (or `klab up --snapshot`)")
            } else {
                format!("its snapshots: {}", have.join(", "))
            },
        ));
    }
    let started = Instant::now();
    let found = find_lab(env, connect, &state).await?;
    let plan = found.saved.clone().ok_or_else(|| {
        Error::user(
            format!("lab {lab} has no saved plan"),
            "run `klab up` first",
        )
    })?;
    let backend = found.backend.clone();
    let held = held(env, &backend, lab, &found.uri, &plan).await?;
    let missing = missing_on(&node_names(&plan), &held, name);
    if !missing.is_empty() {
        return Err(Error::user(
            format!(
                "lab {lab}: snapshot `{name}` is gone from {} (libvirt holds no snapshot of that name for it: rebuilt from a clean disk, added to the lab or removed by hand since the snapshot was taken); nothing was reverted",
                missing.join(", ")
            ),
            format!(
                "take it again with `klab snapshot save {lab} {name}` (it replaces the stale record){}",
                if name == INITIAL {
                    ", or `klab up LAB_FILE --snapshot`"
                } else {
                    ""
                }
            ),
        ));
    }
    let mut reverted: Vec<&NodeSpec> = Vec::new();
    for (i, n) in plan.nodes.iter().enumerate() {
        let (d, s) = (n.domain.clone(), name.to_string());
        if let Err(e) = env
            .call(&backend, format!("revert {d} to {s}"), move |b| {
                b.revert_snapshot(&d, &s)
            })
            .await
        {
            // The ones already back are paused: running again (best effort), and said so.
            let not_resumed = resume_all(env, &backend, &reverted).await;
            let untouched: Vec<&NodeSpec> = plan.nodes[i + 1..].iter().collect();
            let mut msg = format!("lab {lab}: node {} cannot go back to `{name}`: {e}", n.name);
            let resumed: Vec<&NodeSpec> = reverted
                .iter()
                .copied()
                .filter(|r| !not_resumed.iter().any(|(f, _)| *f == r.name))
                .collect();
            if !resumed.is_empty() {
                msg.push_str(&format!(
                    "\n  went back to `{name}` and running again: {}",
                    names(&resumed)
                ));
            }
            for (node, e) in &not_resumed {
                msg.push_str(&format!(
                    "\n  went back to `{name}` but is still paused: {node} ({e})"
                ));
            }
            if !untouched.is_empty() {
                msg.push_str(&format!("\n  not touched: {}", names(&untouched)));
            }
            return Err(Error::user(
                msg,
                format!(
                    "the lab is part snapshot, part as it was: fix the cause and run `klab reset {lab} --to {name}` again (it reverts every node), or `klab up` to repair the lab"
                ),
            ));
        }
        reverted.push(n);
    }
    let not_resumed = resume_all(env, &backend, &reverted).await;
    if !not_resumed.is_empty() {
        return Err(Error::user(
            format!(
                "lab {lab}: every node went back to `{name}`, but some are still paused:\n  {}",
                not_resumed
                    .iter()
                    .map(|(n, e)| format!("{n}: {e}"))
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ),
            format!(
                "`virsh -c {} resume DOMAIN` resumes one; `klab reset {lab} --to {name}` tries again",
                found.uri
            ),
        ));
    }
    // Clocks, then what `up` verifies, over the pinned sessions.
    let user_key = state.user_private_key()?;
    let mut clock_behind = BTreeMap::new();
    for n in &plan.nodes {
        let target = pinned_target(&state, n, &user_key)?;
        let session = env.dialer.dial(&target, timeouts.ssh).await.map_err(|e| {
            Error::user(
                format!("lab {lab}: {} does not answer after the reset: {e}", n.name),
                "`klab status` shows the node; `klab up` repairs the lab",
            )
        })?;
        let host_now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let out = session
            .exec(
                &format!("g=$(date -u +%s.%N); sudo -n date -u -s @{host_now:.3} >/dev/null && echo \"$g\""),
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| Error::user(format!("{}: setting the clock: {e}", n.name), "check the node with `klab ssh`"))?;
        if !out.success() {
            return Err(Error::user(
                format!(
                    "{}: setting the clock failed: {}",
                    n.name,
                    out.stderr.trim()
                ),
                "the lab user needs passwordless sudo (klab's cloud-init gives it)",
            ));
        }
        if let Ok(guest) = out.stdout.trim().parse::<f64>() {
            clock_behind.insert(n.name.clone(), host_now - guest);
        }
        let probe = session
            .exec(crate::verify::PROBE_COMMAND, Duration::from_secs(60))
            .await
            .map_err(|e| Error::user(format!("{}: {e}", n.name), "`klab up` repairs the lab"))?;
        let problems = crate::verify::check(n, &crate::verify::parse_probe(&probe.stdout));
        session.close().await;
        if !problems.is_empty() {
            return Err(Error::user(
                format!(
                    "lab {lab}: {} is not as planned after the reset:\n  {}",
                    n.name,
                    problems.join("\n  ")
                ),
                "the snapshot may predate a change of the lab; `klab up` repairs it, or take a new snapshot",
            ));
        }
    }
    let kubernetes_ready = kubernetes_ready(env, &state, &plan, timeouts).await?;
    Ok(ResetOutcome {
        lab: lab.to_string(),
        snapshot: name.to_string(),
        seconds: started.elapsed().as_secs_f64(),
        clock_behind,
        kubernetes_ready,
    })
}

/// SSH to `node` with the lab's key and its pinned host key.
fn pinned_target(state: &StateDir, node: &NodeSpec, user_key: &str) -> Result<SshTarget, Error> {
    Ok(SshTarget {
        node: node.name.clone(),
        addr: SocketAddr::from((node.ssh_address, 22)),
        user: node.user.clone(),
        user_private_key: user_key.to_string(),
        host_public_key: state.pinned_host_key(&node.name).ok_or_else(|| {
            Error::Internal(format!("no pinned host key for {} in the state", node.name))
        })?,
    })
}

/// For a lab whose cluster klab built: every node Ready again (on the first control plane).
async fn kubernetes_ready(
    env: &Env,
    state: &StateDir,
    plan: &LabPlan,
    timeouts: &crate::model::Timeouts,
) -> Result<Option<bool>, Error> {
    let Some(k) = &plan.kubernetes else {
        return Ok(None);
    };
    let built = state
        .load_journal()
        .ok()
        .flatten()
        .and_then(|j| j.nodes.get(&k.init_node).cloned())
        .is_some_and(|r| {
            r.phases
                .get("kubeconfig")
                .is_some_and(|p| p.status == "done")
        });
    if !built {
        return Ok(None);
    }
    let n = plan
        .node(&k.init_node)
        .ok_or_else(|| Error::Internal("first control plane missing from the plan".into()))?;
    let target = pinned_target(state, n, &state.user_private_key()?)?;
    let session = env
        .dialer
        .dial(&target, timeouts.ssh)
        .await
        .map_err(|e| Error::user(format!("{}: {e}", n.name), "`klab up` repairs the lab"))?;
    let secs = timeouts.nodes_ready.as_secs().max(1);
    let out = session
        .exec(
            &crate::provision::runner::as_root(&format!(
                "kubectl --kubeconfig {} wait --for=condition=Ready node --all --timeout={secs}s >/dev/null",
                crate::plan::provision::ADMIN_CONF
            )),
            Duration::from_secs(secs + 30),
        )
        .await
        .map_err(|e| Error::user(format!("{}: {e}", n.name), "`klab up` repairs the lab"))?;
    session.close().await;
    if !out.success() {
        return Err(Error::user(
            format!(
                "lab {}: not every Kubernetes node is Ready after the reset: {}",
                plan.lab,
                out.stderr.trim()
            ),
            "`klab ssh` to the first control plane and `kubectl get nodes`; `klab provision` reruns the phases",
        ));
    }
    Ok(Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_are_plain_words() {
        assert!(is_snapshot_name("initial") && is_snapshot_name("before-upgrade.2"));
        assert!(!is_snapshot_name("") && !is_snapshot_name("-x") && !is_snapshot_name("A"));
        assert!(!is_snapshot_name("a b") && !is_snapshot_name("a/b") && !is_snapshot_name("$(x)"));
        assert!(!is_snapshot_name(&"a".repeat(41)));
    }

    fn info(name: &str, nodes: &[&str]) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            created_at: 1,
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            paused_seconds: 0.5,
        }
    }

    #[test]
    fn records_are_checked_against_what_each_node_holds() {
        let recs = [info("initial", &["a", "b"]), info("later", &["a", "b"])];
        let held: BTreeMap<String, BTreeSet<String>> = [
            (
                "a".to_string(),
                ["initial", "later"].map(String::from).into(),
            ),
            // b was rebuilt: only `initial` taken again since.
            ("b".to_string(), ["initial"].map(String::from).into()),
        ]
        .into();
        let nodes = ["a", "b", "c"].map(String::from);
        let listed = check_records(&recs, &nodes[..2], &held);
        assert!(listed[0].usable(), "{listed:?}");
        assert_eq!(listed[1].missing_on, ["b"]);
        // A node added to the lab since holds none of them.
        let listed = check_records(&recs, &nodes, &held);
        assert_eq!(listed[0].missing_on, ["c"]);
        assert_eq!(listed[1].missing_on, ["b", "c"]);
        let json = serde_json::to_value(&listed[1]).unwrap();
        assert_eq!(json["name"], "later");
        assert_eq!(json["missing_on"], serde_json::json!(["b", "c"]));
    }

    #[test]
    fn a_rebuilt_node_makes_every_snapshot_with_it_stale() {
        let recs = [info("initial", &["a", "b"]), info("only-a", &["a"])];
        let rebuilt: BTreeSet<String> = ["b".to_string()].into();
        assert_eq!(stale_records(&recs, &rebuilt), ["initial"]);
        assert!(stale_records(&recs, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn clearing_the_records_leaves_none_and_is_safe_twice() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path(), "demo");
        save_records(
            &state,
            &Records {
                snapshots: vec![info("initial", &["a"])],
            },
        )
        .unwrap();
        assert_eq!(records(&state).snapshots.len(), 1);
        clear_records(&state).unwrap();
        assert!(records(&state).snapshots.is_empty());
        clear_records(&state).unwrap();
    }

    #[test]
    fn the_snapshot_xml_keeps_memory_and_the_overlay_and_skips_the_seed() {
        let t = Templates::builtin().unwrap();
        let xml = t.snapshot_xml("demo", "cp1", "initial").unwrap();
        assert!(xml.contains("<name>initial</name>"));
        assert!(xml.contains("<memory snapshot='internal'/>"));
        assert!(xml.contains("<disk name='vda' snapshot='internal'/>"));
        assert!(xml.contains("<disk name='vdb' snapshot='no'/>"));
        assert!(xml.contains("klab snapshot of lab demo, node cp1"));
    }
}
