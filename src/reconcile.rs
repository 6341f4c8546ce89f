//! PURE reconciliation: desired plan + what exists now → the actions `up` or `down` must take.
//!
//! Ownership lives here: an object is the lab's only when it carries the lab's klab tag. Objects
//! that merely look like ours (same name, no tag or another lab's tag) are never touched; `up`
//! refuses to build over them and `down` reports that it left them.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::observed::{DomainState, Observed};
use crate::plan::{LabPlan, NodeSpec};

pub mod journal;
use journal::{Journal, Step};

/// One step `klab up`/`klab down` takes, in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    CreatePool {
        pool: String,
    },
    CreateNetwork {
        network: String,
    },
    StartNetwork {
        network: String,
    },
    RemoveDomain {
        domain: String,
        reason: String,
    },
    RemoveVolume {
        pool: String,
        volume: String,
    },
    /// Overlay volume, seed volume, domain definition, start.
    CreateNode {
        node: String,
    },
    StartNode {
        node: String,
    },
    /// Force off and start again (its NICs fell off their bridge); disks and definition stay.
    RestartNode {
        node: String,
        reason: String,
    },
    /// SSH with the pinned key, `cloud-init status --wait`, address/route/hostname checks.
    WaitNode {
        node: String,
    },
    RemoveNetwork {
        network: String,
    },
    RemovePool {
        pool: String,
    },
}

impl Action {
    /// One line for humans (`--dry-run`, progress).
    pub fn describe(&self) -> String {
        match self {
            Self::CreatePool { pool } => format!("create storage pool {pool}"),
            Self::CreateNetwork { network } => format!("create network {network}"),
            Self::StartNetwork { network } => format!("start network {network}"),
            Self::RemoveDomain { domain, reason } => format!("remove domain {domain} ({reason})"),
            Self::RemoveVolume { pool, volume } => format!("remove volume {pool}/{volume}"),
            Self::CreateNode { node } => format!("create node {node} (overlay, seed, domain)"),
            Self::StartNode { node } => format!("start node {node}"),
            Self::RestartNode { node, reason } => format!("restart node {node} ({reason})"),
            Self::WaitNode { node } => {
                format!("wait for node {node} (pinned SSH, cloud-init, addresses)")
            }
            Self::RemoveNetwork { network } => format!("remove network {network}"),
            Self::RemovePool { pool } => format!("remove storage pool {pool}"),
        }
    }
}

/// Why `up` will not proceed; each names the object and says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub object: String,
    pub message: String,
    pub hint: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}\n  hint: {}",
            self.object, self.message, self.hint
        )
    }
}

/// An object with a lab-like name that `down` did not remove because it is not the lab's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Left {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct UpActions {
    pub actions: Vec<Action>,
    /// Nodes already running and unchanged.
    pub unchanged: Vec<String>,
    /// Built nodes whose seed no longer matches the lab file: only `--recreate` applies it.
    pub drift: Vec<Drift>,
}

/// A change to a built node that `up` cannot apply in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub node: String,
    pub changes: Vec<String>,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node `{}` does not have the lab file's settings: {}; not applied to the running VM — run `klab up --recreate {}` to rebuild it with them",
            self.node,
            self.changes.join(", "),
            self.node
        )
    }
}

impl UpActions {
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty()
    }
}

pub struct UpInput<'a> {
    pub desired: &'a LabPlan,
    /// The plan saved by the previous `up`, if any.
    pub previous: Option<&'a LabPlan>,
    pub observed: &'a Observed,
    /// Nodes the user allows to be rebuilt (`--recreate`).
    pub recreate: &'a BTreeSet<String>,
    /// The lab's journal, if it has one: a running node counts as up to date only when the
    /// journal has it verified with its current seed.
    pub journal: Option<&'a Journal>,
    /// sha256 of every node's rendered seed, by node name.
    pub seed_hashes: &'a BTreeMap<String, String>,
}

/// What must happen to make the hypervisor match `desired`.
pub fn plan_up(input: &UpInput<'_>) -> Result<UpActions, Vec<Refusal>> {
    let d = input.desired;
    let lab = d.lab.as_str();
    let obs = input.observed;
    let mut refusals = Vec::new();
    let mut pre = Vec::new();
    let mut removals = Vec::new();
    let mut creates = Vec::new();
    let mut waits = Vec::new();
    let mut unchanged = Vec::new();
    let mut restarted_networks: BTreeSet<&str> = BTreeSet::new();
    let mut drift = Vec::new();

    for name in input.recreate {
        if d.node(name).is_none() {
            refusals.push(Refusal {
                object: format!("node `{name}`"),
                message: "--recreate names a node that is not in the lab file".into(),
                hint: format!(
                    "nodes are: {}",
                    d.nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }

    // Pool.
    let pool_obs = obs.pools.iter().find(|p| p.name == d.pool.name);
    let pool_volumes: BTreeSet<&str> = obs
        .volumes
        .iter()
        .filter(|v| v.pool == d.pool.name)
        .map(|v| v.name.as_str())
        .collect();
    // An untagged pool is ours only when the state directory proves klab set out to make it
    // (killed between defining and tagging it, or inactive so its tag cannot be seen).
    let state_says_ours = input.journal.is_some_and(|j| j.created_pool(&d.pool.name))
        || input.previous.is_some_and(|p| p.pool.name == d.pool.name);
    match pool_obs {
        None => pre.push(Action::CreatePool {
            pool: d.pool.name.clone(),
        }),
        Some(p) if p.owner.is_none() && state_says_ours => pre.push(Action::CreatePool {
            pool: d.pool.name.clone(),
        }),
        Some(p) if p.owner.as_deref() == Some(lab) && !p.active => pre.push(Action::CreatePool {
            pool: d.pool.name.clone(),
        }),
        Some(p) if p.owner.as_deref() != Some(lab) => refusals.push(Refusal {
            object: format!("storage pool `{}`", p.name),
            message: format!("exists but was not created by klab for lab `{lab}`"),
            hint: "remove or rename that pool, or give the lab another name".into(),
        }),
        Some(_) => {}
    }

    // Networks.
    for net in &d.networks {
        match obs.networks.iter().find(|n| n.name == net.name) {
            None => pre.push(Action::CreateNetwork {
                network: net.name.clone(),
            }),
            Some(o) if o.owner.as_ref().map(|t| t.lab.as_str()) != Some(lab) => refusals
                .push(Refusal {
                object: format!("network `{}`", o.name),
                message: format!("exists but is not tagged as lab `{lab}`'s"),
                hint:
                    "klab never takes over objects it did not create: remove it, or rename the lab"
                        .into(),
            }),
            Some(o) if !o.active => {
                restarted_networks.insert(net.name.as_str());
                pre.push(Action::StartNetwork {
                    network: net.name.clone(),
                })
            }
            Some(_) => {}
        }
        if let Some(prev) = input.previous.and_then(|p| p.network(&net.key)) {
            let was = (
                prev.mode,
                prev.address,
                prev.prefix,
                &prev.bridge,
                prev.gateway,
            );
            let now = (net.mode, net.address, net.prefix, &net.bridge, net.gateway);
            if was != now {
                refusals.push(Refusal {
                    object: format!("network `{}`", net.key),
                    message: format!(
                        "changed from {} {}/{} to {} {}/{}; a running lab cannot change a network in place",
                        prev.mode.as_str(),
                        prev.address,
                        prev.prefix,
                        net.mode.as_str(),
                        net.address,
                        net.prefix
                    ),
                    hint: format!("revert the change, or rebuild: `klab down {lab}` then `klab up`"),
                });
            }
        }
    }

    // Domains of this lab, by node name.
    let ours: BTreeMap<&str, &crate::observed::ObservedDomain> = obs
        .domains
        .iter()
        .filter(|dom| dom.owner.as_ref().map(|t| t.lab.as_str()) == Some(lab))
        .filter_map(|dom| {
            dom.owner
                .as_ref()
                .and_then(|t| t.node.as_deref())
                .map(|n| (n, dom))
        })
        .collect();

    for node in &d.nodes {
        let clash = obs.domains.iter().find(|o| {
            o.name == node.domain && o.owner.as_ref().map(|t| t.lab.as_str()) != Some(lab)
        });
        if let Some(o) = clash {
            refusals.push(Refusal {
                object: format!("domain `{}`", o.name),
                message: format!("exists but is not tagged as lab `{lab}`'s node `{}`", node.name),
                hint: "klab never takes over objects it did not create: remove it, or rename the lab or the node".into(),
            });
            continue;
        }
        let dom = ours.get(node.name.as_str());
        let seed_hash = input
            .seed_hashes
            .get(&node.name)
            .map(String::as_str)
            .unwrap_or("");
        let prev = input
            .previous
            .and_then(|p| p.node(&node.name).map(|prev| (p, prev)));
        let changed = prev.and_then(|(_, prev)| node_change(prev, node));
        let record = input.journal.and_then(|j| j.nodes.get(&node.name));
        // What the node's seed carries changed: cloud-init will not apply it to a built VM, so
        // it is reported (every run, until the node is rebuilt), never recorded as applied.
        let mut seed_changes = prev
            .map(|(p, prev)| seed_change(prev, node, &p.hosts, &d.hosts))
            .unwrap_or_default();
        if seed_changes.is_empty()
            && let Some(r) = record
            && r.step >= Step::Defined
            && !seed_hash.is_empty()
            && r.seed_hash != seed_hash
        {
            seed_changes.push("its cloud-init seed changed since the VM was built".to_string());
        }
        let recreate = input.recreate.contains(&node.name);
        if dom.is_some() && !recreate && !seed_changes.is_empty() {
            drift.push(Drift {
                node: node.name.clone(),
                changes: seed_changes,
            });
        }
        if let (Some(what), false) = (&changed, recreate) {
            refusals.push(Refusal {
                object: format!("node `{}`", node.name),
                message: format!("{what}; this needs the VM rebuilt (its disk is recreated)"),
                hint: format!(
                    "run `klab up --recreate {}` to rebuild it, or revert the change",
                    node.name
                ),
            });
            continue;
        }
        match dom {
            Some(dom) if recreate => {
                removals.push(Action::RemoveDomain {
                    domain: dom.name.clone(),
                    reason: "--recreate".into(),
                });
                push_volume_removals(&mut removals, d, node, &pool_volumes);
                creates.push(Action::CreateNode {
                    node: node.name.clone(),
                });
                waits.push(node.name.clone());
            }
            Some(dom) => match dom.state {
                DomainState::Running => {
                    let detached: Vec<&str> = dom
                        .nics
                        .iter()
                        .filter(|n| {
                            n.attached == Some(false)
                                || restarted_networks.contains(n.network.as_str())
                        })
                        .map(|n| n.network.as_str())
                        .collect();
                    let verified = record.is_some_and(|r| r.step == Step::Verified);
                    if !detached.is_empty() {
                        creates.push(Action::RestartNode {
                            node: node.name.clone(),
                            reason: format!(
                                "its NIC is not on the bridge of {}",
                                detached.join(", ")
                            ),
                        });
                        waits.push(node.name.clone());
                    } else if verified {
                        unchanged.push(node.name.clone());
                    } else {
                        // Running but never verified (a crash, or a klab without a journal):
                        // wait for it and verify it again.
                        waits.push(node.name.clone());
                    }
                }
                DomainState::Paused | DomainState::Other => unchanged.push(node.name.clone()),
                DomainState::Shutoff | DomainState::Crashed => {
                    creates.push(Action::StartNode {
                        node: node.name.clone(),
                    });
                    waits.push(node.name.clone());
                }
            },
            None => {
                // A domain deleted by hand (or a crash before define) leaves disks behind: start
                // from clean disks so the node boots exactly as planned.
                push_volume_removals(&mut removals, d, node, &pool_volumes);
                creates.push(Action::CreateNode {
                    node: node.name.clone(),
                });
                waits.push(node.name.clone());
            }
        }
    }

    // Nodes that left the file: remove their domains and disks.
    for (name, dom) in &ours {
        if d.node(name).is_none() {
            removals.push(Action::RemoveDomain {
                domain: dom.name.clone(),
                reason: "no longer in the lab file".into(),
            });
            let prev_node = input.previous.and_then(|p| p.node(name));
            for vol in prev_node
                .map(|n| vec![n.overlay.name.clone(), n.seed.name.clone()])
                .unwrap_or_default()
            {
                if pool_volumes.contains(vol.as_str()) {
                    removals.push(Action::RemoveVolume {
                        pool: d.pool.name.clone(),
                        volume: vol,
                    });
                }
            }
        }
    }
    // Networks that left the file.
    let mut net_removals = Vec::new();
    for o in &obs.networks {
        let is_ours = o.owner.as_ref().map(|t| t.lab.as_str()) == Some(lab);
        if is_ours && !d.networks.iter().any(|n| n.name == o.name) {
            net_removals.push(Action::RemoveNetwork {
                network: o.name.clone(),
            });
        }
    }

    if !refusals.is_empty() {
        return Err(refusals);
    }
    let mut actions = pre;
    actions.extend(removals);
    actions.extend(net_removals);
    actions.extend(creates);
    actions.extend(waits.into_iter().map(|node| Action::WaitNode { node }));
    Ok(UpActions {
        actions,
        unchanged,
        drift,
    })
}

fn push_volume_removals(
    out: &mut Vec<Action>,
    d: &LabPlan,
    node: &NodeSpec,
    pool_volumes: &BTreeSet<&str>,
) {
    for vol in [&node.overlay.name, &node.seed.name] {
        if pool_volumes.contains(vol.as_str()) {
            out.push(Action::RemoveVolume {
                pool: d.pool.name.clone(),
                volume: vol.clone(),
            });
        }
    }
}

/// What changed in a node's shape that cannot be applied to a running VM, if anything.
fn node_change(prev: &NodeSpec, now: &NodeSpec) -> Option<String> {
    let mut what = Vec::new();
    if prev.cpus != now.cpus {
        what.push(format!("cpus {} → {}", prev.cpus, now.cpus));
    }
    if prev.memory_mib != now.memory_mib {
        what.push(format!(
            "memory {} MiB → {} MiB",
            prev.memory_mib, now.memory_mib
        ));
    }
    if prev.image != now.image {
        what.push(format!("image {} → {}", prev.image, now.image));
    }
    if prev.overlay.capacity_bytes != now.overlay.capacity_bytes {
        what.push("disk size changed".to_string());
    }
    if prev.user != now.user {
        what.push(format!("user {} → {}", prev.user, now.user));
    }
    let nics = |n: &NodeSpec| {
        n.nics
            .iter()
            .map(|c| format!("{}={}", c.network, c.ip))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if nics(prev) != nics(now) {
        what.push(format!("NICs [{}] → [{}]", nics(prev), nics(now)));
    }

    if what.is_empty() {
        None
    } else {
        Some(what.join(", "))
    }
}

/// What changed in what a node's seed carries (NIC dns and mtu, `/etc/hosts`).
fn seed_change(
    prev: &NodeSpec,
    now: &NodeSpec,
    prev_hosts: &[crate::plan::HostEntry],
    now_hosts: &[crate::plan::HostEntry],
) -> Vec<String> {
    let mut what = Vec::new();
    for (a, b) in prev.nics.iter().zip(&now.nics) {
        if a.dns != b.dns {
            let list = |d: &[std::net::Ipv4Addr]| {
                d.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            what.push(format!(
                "dns of {} [{}] → [{}]",
                b.ifname,
                list(&a.dns),
                list(&b.dns)
            ));
        }
        if a.mtu != b.mtu {
            let m = |m: Option<u32>| m.map(|v| v.to_string()).unwrap_or("default".into());
            what.push(format!("mtu of {} {} → {}", b.ifname, m(a.mtu), m(b.mtu)));
        }
    }
    if prev_hosts != now_hosts {
        what.push("/etc/hosts entries changed".to_string());
    }
    what
}

/// What `down` knows without the hypervisor: from the saved plan, when there is one.
#[derive(Debug, Clone, Default)]
pub struct KnownObjects {
    /// Pool name and whether klab created it.
    pub pool: Option<(String, bool)>,
    /// Volume names the lab created in its pool.
    pub volumes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct DownActions {
    pub actions: Vec<Action>,
    pub left: Vec<Left>,
}

/// Everything tagged as `lab`'s, in teardown order: domains, volumes, networks, pool.
pub fn plan_down(lab: &str, observed: &Observed, known: &KnownObjects) -> DownActions {
    let prefix = format!("klab-{lab}-");
    let tagged = |owner: Option<&str>| owner == Some(lab);
    let mut out = DownActions::default();

    let mut our_disks: BTreeSet<&str> = BTreeSet::new();
    for dom in &observed.domains {
        let owner = dom.owner.as_ref().map(|t| t.lab.as_str());
        if tagged(owner) {
            our_disks.extend(dom.disks.iter().map(String::as_str));
            out.actions.push(Action::RemoveDomain {
                domain: dom.name.clone(),
                reason: "klab down".into(),
            });
        } else if dom.name.starts_with(&prefix) && owner.is_none() {
            out.left.push(Left {
                kind: "domain",
                name: dom.name.clone(),
                reason: format!("not tagged by klab as lab `{lab}`'s"),
            });
        }
    }

    let lab_pool = format!("klab-{lab}");
    let mut pools_to_remove = Vec::new();
    for pool in &observed.pools {
        let vols = observed.volumes.iter().filter(|v| v.pool == pool.name);
        if tagged(pool.owner.as_deref()) {
            // The whole pool is the lab's; its tag volume goes last so a crash mid-way keeps it ours.
            let tag = crate::observed::pool_tag_volume(lab);
            let (tags, rest): (Vec<_>, Vec<_>) = vols.partition(|v| v.name == tag);
            for v in rest.into_iter().chain(tags) {
                out.actions.push(Action::RemoveVolume {
                    pool: pool.name.clone(),
                    volume: v.name.clone(),
                });
            }
            pools_to_remove.push(pool.name.clone());
        } else {
            let shared_ours = known
                .pool
                .as_ref()
                .is_some_and(|(name, owned)| name == &pool.name && !owned);
            for v in vols {
                let used_by_ours = our_disks.contains(v.path.as_str());
                let recorded = shared_ours && known.volumes.iter().any(|n| n == &v.name);
                if used_by_ours || recorded {
                    out.actions.push(Action::RemoveVolume {
                        pool: pool.name.clone(),
                        volume: v.name.clone(),
                    });
                }
            }
            if pool.name == lab_pool && pool.owner.is_none() {
                out.left.push(Left {
                    kind: "pool",
                    name: pool.name.clone(),
                    reason: format!("has no klab ownership tag for lab `{lab}`"),
                });
            }
        }
    }

    for net in &observed.networks {
        let owner = net.owner.as_ref().map(|t| t.lab.as_str());
        if tagged(owner) {
            out.actions.push(Action::RemoveNetwork {
                network: net.name.clone(),
            });
        } else if net.name.starts_with(&prefix) && owner.is_none() {
            out.left.push(Left {
                kind: "network",
                name: net.name.clone(),
                reason: format!("not tagged by klab as lab `{lab}`'s"),
            });
        }
    }
    out.actions.extend(
        pools_to_remove
            .into_iter()
            .map(|pool| Action::RemovePool { pool }),
    );
    out
}

#[cfg(test)]
mod tests;
