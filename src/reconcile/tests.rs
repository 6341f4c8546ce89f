use std::net::Ipv4Addr;

use super::*;
use crate::model::{Accel, NetworkMode, OsFamily, Role};
use crate::observed::{
    ObservedDomain, ObservedNetwork, ObservedNic, ObservedPool, ObservedVolume, OwnerTag,
    pool_tag_volume,
};
use crate::plan::*;
use crate::reconcile::journal::{Journal, Step};

fn node(lab: &str, name: &str, ip: u8) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        role: Role::None,
        domain: format!("klab-{lab}-{name}"),
        cpus: 1,
        memory_mib: 1024,
        image: "debian-12".into(),
        user: "klab".into(),
        overlay: VolumeSpec {
            name: format!("{name}.qcow2"),
            path: format!("/p/{name}.qcow2"),
            format: VolumeFormat::Qcow2,
            capacity_bytes: 2 << 30,
            backing: Some("/img/debian-12.qcow2".into()),
        },
        seed: VolumeSpec {
            name: format!("{name}-seed.img"),
            path: format!("/p/{name}-seed.img"),
            format: VolumeFormat::Raw,
            capacity_bytes: 0,
            backing: None,
        },
        nics: vec![NicSpec {
            network: "outside".into(),
            libvirt_network: format!("klab-{lab}-outside"),
            ifname: "ext0".into(),
            mac: format!("52:54:00:00:00:{ip:02x}"),
            ip: Ipv4Addr::new(10, 0, 0, ip),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: vec![],
            mtu: None,
        }],
        ssh_address: Ipv4Addr::new(10, 0, 0, ip),
        cluster_ip: Ipv4Addr::new(10, 0, 0, ip),
        console_log: format!("/c/klab-{lab}-{name}.log"),
        instance_id: format!("klab-{lab}-{name}-0"),
    }
}

fn lab_plan(lab: &str, nodes: &[(&str, u8)]) -> LabPlan {
    LabPlan {
        lab: lab.into(),
        prefix: format!("klab-{lab}"),
        uri: "test:///default".into(),
        accel: Accel::Qemu,
        owner: Ownership {
            namespace: OWNER_NS.into(),
            lab: lab.into(),
        },
        pool: PoolSpec {
            name: format!("klab-{lab}"),
            path: format!("/p/{lab}"),
        },
        networks: vec![NetworkSpec {
            key: "outside".into(),
            name: format!("klab-{lab}-outside"),
            mode: NetworkMode::Isolated,
            bridge: "kl-00000000".into(),
            address: Ipv4Addr::new(10, 0, 0, 0),
            prefix: 24,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            host_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            dns: vec![],
            mtu: None,
            mac_seed: "00".into(),
        }],
        images: vec![ImageSpec {
            key: "debian-12".into(),
            family: OsFamily::Debian,
            base_path: "/img/debian-12.qcow2".into(),
            url: None,
            sha256: None,
            kernel: None,
            initrd: None,
            cmdline: None,
        }],
        nodes: nodes.iter().map(|(n, ip)| node(lab, n, *ip)).collect(),
        hosts: vec![],
        kubernetes: None,
        steps: vec![],
    }
}

fn tag(lab: &str, node: Option<&str>) -> Option<OwnerTag> {
    Some(OwnerTag {
        lab: lab.into(),
        node: node.map(Into::into),
    })
}

/// What the hypervisor shows once `plan` is fully up.
fn observed_up(plan: &LabPlan) -> Observed {
    let lab = plan.lab.as_str();
    let mut o = Observed {
        pools: vec![ObservedPool {
            name: plan.pool.name.clone(),
            path: Some(plan.pool.path.clone()),
            active: true,
            owner: Some(lab.into()),
        }],
        ..Default::default()
    };
    o.volumes.push(ObservedVolume {
        pool: plan.pool.name.clone(),
        name: pool_tag_volume(lab),
        path: format!("{}/{}", plan.pool.path, pool_tag_volume(lab)),
    });
    for n in &plan.networks {
        o.networks.push(ObservedNetwork {
            name: n.name.clone(),
            owner: tag(lab, None),
            active: true,
            bridge: Some(n.bridge.clone()),
        });
    }
    for n in &plan.nodes {
        o.domains.push(ObservedDomain {
            name: n.domain.clone(),
            owner: tag(lab, Some(&n.name)),
            state: DomainState::Running,
            disks: vec![n.overlay.path.clone(), n.seed.path.clone()],
            nics: n
                .nics
                .iter()
                .map(|nic| ObservedNic {
                    network: nic.libvirt_network.clone(),
                    attached: Some(true),
                })
                .collect(),
        });
        for v in [&n.overlay, &n.seed] {
            o.volumes.push(ObservedVolume {
                pool: plan.pool.name.clone(),
                name: v.name.clone(),
                path: v.path.clone(),
            });
        }
    }
    o
}

/// Seed hashes as `up` computes them (values are opaque to the reconciler).
fn hashes(plan: &LabPlan) -> BTreeMap<String, String> {
    plan.nodes
        .iter()
        .map(|n| (n.name.clone(), format!("seed-of-{}", n.name)))
        .collect()
}

/// A journal in which every node of `plan` was verified with its current seed.
fn verified(plan: &LabPlan) -> Journal {
    let mut j = Journal::new(&plan.lab);
    j.pool = Some(plan.pool.name.clone());
    for (n, h) in hashes(plan) {
        j.reach(&n, Step::Verified, &h);
    }
    j
}

fn up_with(
    desired: &LabPlan,
    previous: Option<&LabPlan>,
    observed: &Observed,
    journal: Option<&Journal>,
) -> Result<UpActions, Vec<Refusal>> {
    plan_up(&UpInput {
        desired,
        previous,
        observed,
        recreate: &BTreeSet::new(),
        journal,
        seed_hashes: &hashes(desired),
    })
}

/// `up` with a journal that has every node of `previous` (or `desired`) verified.
fn up(
    desired: &LabPlan,
    previous: Option<&LabPlan>,
    observed: &Observed,
) -> Result<UpActions, Vec<Refusal>> {
    let j = verified(previous.unwrap_or(desired));
    up_with(desired, previous, observed, Some(&j))
}

#[test]
fn fresh_lab_creates_pool_networks_nodes_then_waits() {
    let p = lab_plan("demo", &[("a", 10), ("b", 11)]);
    let acts = up(&p, None, &Observed::default()).unwrap().actions;
    assert_eq!(
        acts,
        vec![
            Action::CreatePool {
                pool: "klab-demo".into()
            },
            Action::CreateNetwork {
                network: "klab-demo-outside".into()
            },
            Action::CreateNode { node: "a".into() },
            Action::CreateNode { node: "b".into() },
            Action::WaitNode { node: "a".into() },
            Action::WaitNode { node: "b".into() },
        ]
    );
}

#[test]
fn lab_that_is_up_is_a_noop() {
    let p = lab_plan("demo", &[("a", 10), ("b", 11)]);
    let r = up(&p, Some(&p), &observed_up(&p)).unwrap();
    assert!(r.is_noop(), "{:?}", r.actions);
    assert_eq!(r.unchanged, vec!["a".to_string(), "b".to_string()]);
}

#[test]
fn domain_deleted_by_hand_is_recreated_alone_from_clean_disks() {
    let p = lab_plan("demo", &[("a", 10), ("b", 11)]);
    let mut o = observed_up(&p);
    o.domains.retain(|d| d.name != "klab-demo-b");
    let acts = up(&p, Some(&p), &o).unwrap().actions;
    assert_eq!(
        acts,
        vec![
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "b.qcow2".into()
            },
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "b-seed.img".into()
            },
            Action::CreateNode { node: "b".into() },
            Action::WaitNode { node: "b".into() },
        ]
    );
}

#[test]
fn added_node_adds_only_that_node() {
    let old = lab_plan("demo", &[("a", 10)]);
    let new = lab_plan("demo", &[("a", 10), ("b", 11)]);
    let acts = up(&new, Some(&old), &observed_up(&old)).unwrap().actions;
    assert_eq!(
        acts,
        vec![
            Action::CreateNode { node: "b".into() },
            Action::WaitNode { node: "b".into() }
        ]
    );
}

#[test]
fn stopped_node_is_started_not_rebuilt() {
    let p = lab_plan("demo", &[("a", 10)]);
    let mut o = observed_up(&p);
    o.domains[0].state = DomainState::Shutoff;
    let acts = up(&p, Some(&p), &o).unwrap().actions;
    assert_eq!(
        acts,
        vec![
            Action::StartNode { node: "a".into() },
            Action::WaitNode { node: "a".into() }
        ]
    );
}

#[test]
fn ip_change_is_refused_unless_recreate() {
    let old = lab_plan("demo", &[("a", 10)]);
    let new = lab_plan("demo", &[("a", 20)]);
    let o = observed_up(&old);
    let err = up(&new, Some(&old), &o).unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err[0].object, "node `a`");
    assert!(
        err[0].message.contains("outside=10.0.0.10"),
        "{}",
        err[0].message
    );
    assert!(err[0].hint.contains("klab up --recreate a"));

    let recreate = BTreeSet::from(["a".to_string()]);
    let acts = plan_up(&UpInput {
        desired: &new,
        previous: Some(&old),
        observed: &o,
        recreate: &recreate,
        journal: None,
        seed_hashes: &hashes(&new),
    })
    .unwrap()
    .actions;
    assert_eq!(
        acts,
        vec![
            Action::RemoveDomain {
                domain: "klab-demo-a".into(),
                reason: "--recreate".into()
            },
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "a.qcow2".into()
            },
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "a-seed.img".into()
            },
            Action::CreateNode { node: "a".into() },
            Action::WaitNode { node: "a".into() },
        ]
    );
}

#[test]
fn network_cidr_change_is_refused() {
    let old = lab_plan("demo", &[("a", 10)]);
    let mut new = old.clone();
    new.networks[0].prefix = 23;
    let err = up(&new, Some(&old), &observed_up(&old)).unwrap_err();
    assert!(
        err[0]
            .message
            .contains("isolated 10.0.0.0/24 to isolated 10.0.0.0/23")
    );
    assert!(err[0].hint.contains("klab down demo"));
}

#[test]
fn look_alike_objects_block_up_instead_of_being_taken_over() {
    let p = lab_plan("demo", &[("a", 10)]);
    let o = Observed {
        domains: vec![ObservedDomain {
            name: "klab-demo-a".into(),
            owner: None,
            state: DomainState::Running,
            disks: vec![],
            nics: vec![],
        }],
        networks: vec![ObservedNetwork {
            name: "klab-demo-outside".into(),
            owner: tag("other", None),
            active: true,
            bridge: None,
        }],
        pools: vec![ObservedPool {
            name: "klab-demo".into(),
            path: None,
            active: true,
            owner: None,
        }],
        volumes: vec![],
    };
    let err = up_with(&p, None, &o, None).unwrap_err();
    let objects: Vec<_> = err.iter().map(|r| r.object.as_str()).collect();
    assert_eq!(
        objects,
        vec![
            "storage pool `klab-demo`",
            "network `klab-demo-outside`",
            "domain `klab-demo-a`"
        ]
    );
}

#[test]
fn removed_node_is_torn_down() {
    let old = lab_plan("demo", &[("a", 10), ("b", 11)]);
    let new = lab_plan("demo", &[("a", 10)]);
    let acts = up(&new, Some(&old), &observed_up(&old)).unwrap().actions;
    assert_eq!(
        acts,
        vec![
            Action::RemoveDomain {
                domain: "klab-demo-b".into(),
                reason: "no longer in the lab file".into()
            },
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "b.qcow2".into()
            },
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "b-seed.img".into()
            },
        ]
    );
}

#[test]
fn down_removes_only_tagged_objects_in_order_and_reports_look_alikes() {
    let p = lab_plan("demo", &[("a", 10)]);
    let mut o = observed_up(&p);
    // A foreign domain and network whose names look like ours, and another lab sharing the prefix.
    o.domains.push(ObservedDomain {
        name: "klab-demo-impostor".into(),
        owner: None,
        state: DomainState::Running,
        disks: vec![],
        nics: vec![],
    });
    o.networks.push(ObservedNetwork {
        name: "klab-demo-lookalike".into(),
        owner: None,
        active: true,
        bridge: None,
    });
    o.domains.push(ObservedDomain {
        name: "klab-demo-2-x".into(),
        owner: tag("demo-2", Some("x")),
        state: DomainState::Running,
        disks: vec![],
        nics: vec![],
    });
    let r = plan_down("demo", &o, &KnownObjects::default());
    assert_eq!(
        r.actions,
        vec![
            Action::RemoveDomain {
                domain: "klab-demo-a".into(),
                reason: "klab down".into()
            },
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "a.qcow2".into()
            },
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "a-seed.img".into()
            },
            Action::RemoveVolume {
                pool: "klab-demo".into(),
                volume: "klab-owner-demo.tag".into()
            },
            Action::RemoveNetwork {
                network: "klab-demo-outside".into()
            },
            Action::RemovePool {
                pool: "klab-demo".into()
            },
        ]
    );
    let left: Vec<_> = r.left.iter().map(|l| (l.kind, l.name.as_str())).collect();
    assert_eq!(
        left,
        vec![
            ("domain", "klab-demo-impostor"),
            ("network", "klab-demo-lookalike")
        ]
    );
}

#[test]
fn down_of_a_removed_lab_does_nothing() {
    let r = plan_down("demo", &Observed::default(), &KnownObjects::default());
    assert!(r.actions.is_empty() && r.left.is_empty());
}

#[test]
fn down_in_a_shared_pool_removes_only_the_labs_volumes() {
    let p = lab_plan("demo", &[("a", 10)]);
    let mut o = observed_up(&p);
    o.pools[0] = ObservedPool {
        name: "default".into(),
        path: Some("/p".into()),
        active: true,
        owner: None,
    };
    o.volumes.retain(|v| !v.name.ends_with(".tag"));
    for v in &mut o.volumes {
        v.pool = "default".into();
    }
    o.volumes.push(ObservedVolume {
        pool: "default".into(),
        name: "someone-elses.qcow2".into(),
        path: "/p/someone-elses.qcow2".into(),
    });
    let r = plan_down("demo", &o, &KnownObjects::default());
    let vols: Vec<_> = r
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::RemoveVolume { volume, .. } => Some(volume.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(vols, vec!["a.qcow2", "a-seed.img"]);
    assert!(
        !r.actions
            .iter()
            .any(|a| matches!(a, Action::RemovePool { .. }))
    );
}

#[test]
fn a_running_node_never_verified_is_waited_for_again_not_up_to_date() {
    let p = lab_plan("demo", &[("a", 10), ("b", 11)]);
    let o = observed_up(&p);
    // Killed after `a` booted, before it was verified.
    let mut j = verified(&p);
    j.reach("a", Step::Started, "seed-of-a");
    let r = up_with(&p, Some(&p), &o, Some(&j)).unwrap();
    assert_eq!(r.actions, vec![Action::WaitNode { node: "a".into() }]);
    assert_eq!(r.unchanged, vec!["b".to_string()]);
    // No journal at all (a lab made by a klab without one): every node is verified again.
    let r = up_with(&p, Some(&p), &o, None).unwrap();
    assert_eq!(
        r.actions,
        vec![
            Action::WaitNode { node: "a".into() },
            Action::WaitNode { node: "b".into() }
        ]
    );
}

#[test]
fn an_untagged_pool_is_claimed_only_when_the_journal_says_klab_made_it() {
    let p = lab_plan("demo", &[("a", 10)]);
    let o = Observed {
        pools: vec![ObservedPool {
            name: "klab-demo".into(),
            path: Some(p.pool.path.clone()),
            active: true,
            owner: None,
        }],
        ..Default::default()
    };
    // Killed between defining the pool and tagging it.
    let mut j = Journal::new("demo");
    j.pool = Some("klab-demo".into());
    let acts = up_with(&p, None, &o, Some(&j)).unwrap().actions;
    assert_eq!(
        acts[0],
        Action::CreatePool {
            pool: "klab-demo".into()
        }
    );
    // Without that proof it is somebody else's.
    let err = up_with(&p, None, &o, Some(&Journal::new("demo"))).unwrap_err();
    assert_eq!(err[0].object, "storage pool `klab-demo`");
    let err = up_with(&p, None, &o, None).unwrap_err();
    assert_eq!(err[0].object, "storage pool `klab-demo`");
}

#[test]
fn a_restarted_network_restarts_and_reverifies_the_nodes_on_it() {
    let p = lab_plan("demo", &[("a", 10), ("b", 11)]);
    // `virsh net-destroy`: the network is inactive, the running domains' taps are off its bridge.
    let mut o = observed_up(&p);
    o.networks[0].active = false;
    for d in &mut o.domains {
        for n in &mut d.nics {
            n.attached = Some(false);
        }
    }
    let acts = up(&p, Some(&p), &o).unwrap().actions;
    let reason = "its NIC is not on the bridge of klab-demo-outside".to_string();
    assert_eq!(
        acts,
        vec![
            Action::StartNetwork {
                network: "klab-demo-outside".into()
            },
            Action::RestartNode {
                node: "a".into(),
                reason: reason.clone()
            },
            Action::RestartNode {
                node: "b".into(),
                reason
            },
            Action::WaitNode { node: "a".into() },
            Action::WaitNode { node: "b".into() },
        ]
    );
    // The network was restarted by someone else: active, but `b`'s NIC is still off the bridge.
    let mut o = observed_up(&p);
    o.domains[1].nics[0].attached = Some(false);
    let acts = up(&p, Some(&p), &o).unwrap().actions;
    assert_eq!(
        acts,
        vec![
            Action::RestartNode {
                node: "b".into(),
                reason: "its NIC is not on the bridge of klab-demo-outside".into()
            },
            Action::WaitNode { node: "b".into() },
        ]
    );
    // Unknown attachment (remote URI) is not a reason to restart.
    let mut o = observed_up(&p);
    o.domains[1].nics[0].attached = None;
    assert!(up(&p, Some(&p), &o).unwrap().is_noop());
}

#[test]
fn dns_mtu_and_hosts_changes_are_reported_as_drift_not_saved_as_applied() {
    let old = lab_plan("demo", &[("a", 10)]);
    let mut new = old.clone();
    new.nodes[0].nics[0].dns = vec![Ipv4Addr::new(10, 0, 0, 53)];
    new.nodes[0].nics[0].mtu = Some(1400);
    new.hosts.push(HostEntry {
        ip: Ipv4Addr::new(10, 0, 0, 99),
        names: vec!["extra".into()],
    });
    let r = up(&new, Some(&old), &observed_up(&old)).unwrap();
    assert!(r.is_noop(), "{:?}", r.actions);
    assert_eq!(
        r.drift,
        vec![Drift {
            node: "a".into(),
            changes: vec![
                "dns of ext0 [] → [10.0.0.53]".into(),
                "mtu of ext0 default → 1400".into(),
                "/etc/hosts entries changed".into()
            ]
        }]
    );
    assert_eq!(
        r.drift[0].to_string(),
        "node `a` does not have the lab file's settings: dns of ext0 [] → [10.0.0.53], mtu of ext0 default → 1400, /etc/hosts entries changed; not applied to the running VM — run `klab up --recreate a` to rebuild it with them"
    );
    // Next run the saved plan already says "new", but the journal still has the old seed: the
    // drift is reported again.
    let mut j = verified(&new);
    j.reach("a", Step::Verified, "the-seed-it-was-built-with");
    let r = up_with(&new, Some(&new), &observed_up(&new), Some(&j)).unwrap();
    assert!(r.is_noop());
    assert_eq!(
        r.drift[0].changes,
        vec!["its cloud-init seed changed since the VM was built".to_string()]
    );
}
