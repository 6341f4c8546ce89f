//! PURE: copies of one lab on one host (teaching: twenty students, twenty identical labs). A copy
//! is the same lab under its own name (`<lab>-<copy>`, shortened to the name limit), with every
//! network moved to its own subnet of the same size out of a host-wide pool; fixed addresses keep
//! their host part (the control plane's `.10` stays `.10`), and so do gateways, name servers inside
//! the network and the API VIP. Names, bridges, MACs, keys and the cluster identity follow from the
//! new name. Which subnets are taken (other labs, other copies, host routes) comes in as input.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use sha2::{Digest, Sha256};

use crate::config::units::LAB_NAME_MAX;
use crate::model::{Lab, NetworkMode};

/// The pool copies take their subnets from unless `[host] subnet-pool` or `KLAB_SUBNET_POOL` says
/// otherwise: 4096 /24s of private space that home and office networks rarely use.
pub const DEFAULT_POOL: &str = "10.240.0.0/12";
/// A copy's name: what students are told (`1`, `alice`, `team-3`).
pub const COPY_NAME_MAX: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error(
        "`{0}` is not a copy name: use 1–{COPY_NAME_MAX} lowercase letters, digits or `-` (not at either end)"
    )]
    BadName(String),
    #[error(
        "network `{network}` bridges onto the host's `{bridge}`: its addresses belong to that LAN, so copies of this lab would collide there"
    )]
    Bridged { network: String, bridge: String },
    #[error(
        "the subnet pool {pool} has no free /{prefix} left for network `{network}` of lab `{lab}` ({taken} subnets of the pool are taken)"
    )]
    PoolFull {
        pool: Ipv4Network,
        prefix: u8,
        network: String,
        lab: String,
        taken: usize,
    },
    #[error("network `{network}` (/{prefix}) is larger than the subnet pool {pool}")]
    TooLarge {
        network: String,
        prefix: u8,
        pool: Ipv4Network,
    },
}

impl CopyError {
    pub fn hint(&self) -> &'static str {
        match self {
            Self::BadName(_) => {
                "name copies like `1`, `2`, … (`--copies N` does) or after the students"
            }
            Self::Bridged { .. } => {
                "make the network `nat` or `isolated` to run copies of the lab, or run one lab on that LAN"
            }
            Self::PoolFull { .. } | Self::TooLarge { .. } => {
                "give a larger pool with [host] subnet-pool or KLAB_SUBNET_POOL, or remove copies with `klab down LAB --all-copies`"
            }
        }
    }
}

pub fn is_copy_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= COPY_NAME_MAX
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn sha(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// `<lab>-<copy>`; when that is longer than a lab name may be, the lab part is cut and four hex
/// digits of its sha256 keep different labs apart (`kubernetes-workshop` + `12` →
/// `kubernetes-wof894-12`).
pub fn copy_lab_name(lab: &str, copy: &str) -> String {
    let full = format!("{lab}-{copy}");
    if full.len() <= LAB_NAME_MAX {
        return full;
    }
    let digest = Sha256::digest(lab.as_bytes());
    let tag: String = digest[..2].iter().map(|b| format!("{b:02x}")).collect();
    let keep = LAB_NAME_MAX.saturating_sub(copy.len() + 1 + tag.len());
    let head = lab[..keep.min(lab.len())].trim_end_matches('-');
    format!("{head}{tag}-{copy}")
}

/// The same host part in another network of the same size.
fn rebase(addr: Ipv4Addr, from: Ipv4Network, to: Ipv4Network) -> Ipv4Addr {
    if !from.contains(addr) {
        return addr;
    }
    let host = u32::from(addr) & !u32::from(from.mask());
    Ipv4Addr::from(u32::from(to.network()) | host)
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// A free subnet of `prefix` in `pool`: the slot the hash of (lab, copy, network) names, else the
/// next free one after it. The same inputs always give the same subnet.
fn pick(
    pool: Ipv4Network,
    prefix: u8,
    seed: [u8; 32],
    taken: &[Ipv4Network],
) -> Option<Ipv4Network> {
    let slots: u64 = 1u64 << (prefix - pool.prefix());
    let start = u64::from_le_bytes(seed[..8].try_into().unwrap_or([0; 8])) % slots;
    let size: u64 = 1u64 << (32 - prefix);
    (0..slots).find_map(|i| {
        let slot = (start + i) % slots;
        let base = u64::from(u32::from(pool.network())) + slot * size;
        let net = Ipv4Network::new(Ipv4Addr::from(base as u32), prefix).ok()?;
        (!taken.iter().any(|t| overlaps(*t, net))).then_some(net)
    })
}

/// `lab` as copy `copy`: renamed, every network moved into `pool` clear of `taken` (and of the
/// lab's own pod and service ranges), addresses rebased. `previous`, when the registry already
/// holds this copy's subnets, keeps them (stable across runs).
pub fn derive(
    lab: &Lab,
    copy: &str,
    pool: Ipv4Network,
    taken: &[Ipv4Network],
    previous: Option<&[(String, Ipv4Network)]>,
) -> Result<Lab, CopyError> {
    if !is_copy_name(copy) {
        return Err(CopyError::BadName(copy.to_string()));
    }
    let mut out = lab.clone();
    out.name = copy_lab_name(&lab.name, copy);
    let mut avoid: Vec<Ipv4Network> = taken.to_vec();
    if let Some(k) = &lab.kubernetes {
        avoid.push(k.pod_cidr);
        avoid.push(k.service_cidr);
    }
    let mut moves: Vec<(String, Ipv4Network, Ipv4Network)> = Vec::new();
    for net in &lab.networks {
        if net.mode == NetworkMode::Bridge {
            return Err(CopyError::Bridged {
                network: net.name.clone(),
                bridge: net.bridge.clone().unwrap_or_default(),
            });
        }
        let prefix = net.cidr.prefix();
        if prefix < pool.prefix() {
            return Err(CopyError::TooLarge {
                network: net.name.clone(),
                prefix,
                pool,
            });
        }
        let kept = previous
            .and_then(|p| p.iter().find(|(k, _)| *k == net.name))
            .map(|(_, c)| *c)
            .filter(|c| c.prefix() == prefix);
        let new =
            match kept {
                Some(c) => c,
                None => pick(pool, prefix, sha(&[&lab.name, copy, &net.name]), &avoid).ok_or_else(
                    || CopyError::PoolFull {
                        pool,
                        prefix,
                        network: net.name.clone(),
                        lab: out.name.clone(),
                        taken: avoid.iter().filter(|t| overlaps(**t, pool)).count(),
                    },
                )?,
            };
        avoid.push(new);
        moves.push((net.name.clone(), net.cidr, new));
    }
    let moved = |key: &str| {
        moves
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, a, b)| (*a, *b))
    };
    for net in &mut out.networks {
        if let Some((from, to)) = moved(&net.name) {
            net.cidr = to;
            net.gateway = rebase(net.gateway, from, to);
            for d in &mut net.dns {
                *d = rebase(*d, from, to);
            }
        }
    }
    for node in &mut out.nodes {
        for nic in &mut node.nics {
            if let Some((from, to)) = moved(&nic.network) {
                nic.ip = rebase(nic.ip, from, to);
            }
        }
    }
    if let Some(k) = &mut out.kubernetes
        && let Some(vip) = k.control_plane_vip
        && let Some((from, to)) = moved(&k.cluster_network)
    {
        k.control_plane_vip = Some(rebase(vip, from, to));
    }
    Ok(out)
}

/// The networks of a derived copy, for the host-wide registry.
pub fn subnets(lab: &Lab) -> Vec<(String, Ipv4Network)> {
    lab.networks
        .iter()
        .map(|n| (n.name.clone(), n.cidr))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fixtures;

    fn pool() -> Ipv4Network {
        DEFAULT_POOL.parse().unwrap()
    }

    /// The fixtures bridge one network onto the host's LAN; copies need it routed or isolated.
    fn unbridged(mut lab: Lab) -> Lab {
        for n in &mut lab.networks {
            if n.mode == NetworkMode::Bridge {
                n.mode = NetworkMode::Isolated;
                n.bridge = None;
            }
        }
        lab
    }

    #[test]
    fn a_bridged_network_cannot_be_copied() {
        let e = derive(&fixtures::ha_lab(), "1", pool(), &[], None).unwrap_err();
        assert!(matches!(e, CopyError::Bridged { .. }), "{e}");
    }

    #[test]
    fn names_fit_the_limit_and_stay_apart() {
        assert_eq!(copy_lab_name("demo", "1"), "demo-1");
        // 19 + 1 + 2 > 20: cut, with four hex of sha256("kubernetes-workshop") (Python's
        // hashlib: f894…) keeping two long labs apart.
        let long = copy_lab_name("kubernetes-workshop", "12");
        assert_eq!(long, "kubernetes-wof894-12");
        assert!(long.len() <= LAB_NAME_MAX);
        assert!(crate::config::units::is_lab_name(&long));
        assert_ne!(
            copy_lab_name("kubernetes-workshop", "12"),
            copy_lab_name("kubernetes-workshoq", "12")
        );
        assert!(!is_copy_name("") && !is_copy_name("-a") && !is_copy_name("Alice"));
        assert!(!is_copy_name("abcdefghijk") && is_copy_name("team-3"));
    }

    #[test]
    fn a_copy_keeps_host_parts_and_is_stable() {
        let lab = unbridged(fixtures::ha_lab());
        let a = derive(&lab, "1", pool(), &[], None).unwrap();
        let again = derive(&lab, "1", pool(), &[], None).unwrap();
        assert_eq!(a, again);
        assert_eq!(a.name, format!("{}-1", lab.name));
        for (old, new) in lab.networks.iter().zip(&a.networks) {
            assert_eq!(old.cidr.prefix(), new.cidr.prefix());
            assert!(pool().contains(new.cidr.network()));
            let host = |ip: Ipv4Addr, n: Ipv4Network| u32::from(ip) & !u32::from(n.mask());
            assert_eq!(host(old.gateway, old.cidr), host(new.gateway, new.cidr));
        }
        for (old, new) in lab.nodes.iter().zip(&a.nodes) {
            for (o, n) in old.nics.iter().zip(&new.nics) {
                assert_eq!(o.ip.octets()[3], n.ip.octets()[3], "{}", old.name);
            }
        }
        let (k0, k1) = (
            lab.kubernetes.clone().unwrap(),
            a.kubernetes.clone().unwrap(),
        );
        assert_eq!(
            k0.control_plane_vip.unwrap().octets()[3],
            k1.control_plane_vip.unwrap().octets()[3]
        );
        let cluster = a
            .networks
            .iter()
            .find(|n| n.name == k1.cluster_network)
            .unwrap();
        assert!(cluster.cidr.contains(k1.control_plane_vip.unwrap()));
        // Recorded subnets are kept even when the hash would now pick another.
        let rec = subnets(&a);
        let kept = derive(&lab, "1", pool(), &[rec[0].1], Some(&rec)).unwrap();
        assert_eq!(subnets(&kept), rec);
    }

    #[test]
    fn a_thousand_copies_never_collide_in_the_default_pool() {
        let lab = unbridged(fixtures::plain_lab());
        let mut taken: Vec<Ipv4Network> = Vec::new();
        for i in 1..=1000 {
            let c = derive(&lab, &i.to_string(), pool(), &taken, None).unwrap();
            for (_, net) in subnets(&c) {
                assert!(!taken.iter().any(|t| overlaps(*t, net)), "copy {i}: {net}");
                taken.push(net);
            }
        }
        assert_eq!(taken.len(), 1000 * lab.networks.len());
    }

    #[test]
    fn pod_and_service_ranges_and_a_small_pool_are_respected() {
        let lab = unbridged(fixtures::ha_lab());
        let k = lab.kubernetes.clone().unwrap();
        // A pool that is exactly the pod range plus one /24: only that /24 is free.
        let tiny: Ipv4Network = "10.10.0.0/23".parse().unwrap();
        let e = derive(&lab, "1", tiny, &["10.10.0.0/24".parse().unwrap()], None).unwrap_err();
        assert!(matches!(e, CopyError::PoolFull { .. }), "{e}");
        assert!(e.to_string().contains("no free /24"));
        let c = derive(&lab, "2", pool(), &[], None).unwrap();
        for (_, net) in subnets(&c) {
            assert!(!overlaps(net, k.pod_cidr) && !overlaps(net, k.service_cidr));
        }
        assert!(matches!(
            derive(&lab, "Bad", pool(), &[], None),
            Err(CopyError::BadName(_))
        ));
    }
}
