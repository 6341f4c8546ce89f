//! Host checks for local URIs: the lab's subnets against the host's routes, host bridges,
//! libvirt's dnsmasq directory, and — before SSH — that the route to a node leaves through the
//! lab's own bridge (never the default route). Reads `/proc/net/route` and `/sys/class/net`
//! through [`HostFs`] so tests can point it elsewhere.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnetwork::Ipv4Network;

use crate::model::NetworkMode;
use crate::plan::LabPlan;

/// A route of the host, from /proc/net/route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub iface: String,
    pub net: Ipv4Network,
    pub metric: u32,
}

/// Parse /proc/net/route (hex, little-endian addresses), default routes included.
pub fn parse_proc_routes(text: &str) -> Vec<HostRoute> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| Ipv4Addr::from(v.swap_bytes()))
        };
        if let (Some(dest), Some(mask)) = (hex(f[1]), hex(f[7])) {
            let prefix = u32::from(mask).count_ones() as u8;
            if let Ok(net) = Ipv4Network::new(dest, prefix) {
                out.push(HostRoute {
                    iface: f[0].to_string(),
                    net,
                    metric: f[6].parse().unwrap_or(0),
                });
            }
        }
    }
    out
}

/// The route the kernel would pick for `addr`: longest prefix, then lowest metric.
pub fn route_for(routes: &[HostRoute], addr: Ipv4Addr) -> Option<&HostRoute> {
    routes
        .iter()
        .filter(|r| r.net.contains(addr))
        .max_by(|a, b| {
            a.net
                .prefix()
                .cmp(&b.net.prefix())
                .then(b.metric.cmp(&a.metric))
        })
}

/// Problems that would make the lab collide with the host, given the host's routes and interfaces.
pub fn clashes(
    plan: &LabPlan,
    routes: &[HostRoute],
    bridge_exists: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let ours: Vec<&str> = plan.networks.iter().map(|n| n.bridge.as_str()).collect();
    let mut problems = Vec::new();
    for n in &plan.networks {
        match n.mode {
            NetworkMode::Bridge => {
                if !bridge_exists(&n.bridge) {
                    problems.push(format!(
                        "network `{}` uses host bridge `{}`, which does not exist on this host (create it first, e.g. with systemd-networkd or `ip link add {} type bridge`)",
                        n.key, n.bridge, n.bridge
                    ));
                }
            }
            NetworkMode::Nat | NetworkMode::Isolated => {
                let Ok(net) = Ipv4Network::new(n.address, n.prefix) else {
                    continue;
                };
                for r in routes.iter().filter(|r| r.net.prefix() > 0) {
                    if ours.contains(&r.iface.as_str()) {
                        continue;
                    }
                    if r.net.contains(net.network()) || net.contains(r.net.network()) {
                        problems.push(format!(
                            "network `{}` ({}/{}) overlaps the host's route {} on `{}`; pick a free range (e.g. another 10.x.y.0/24)",
                            n.key, n.address, n.prefix, r.net, r.iface
                        ));
                    }
                }
            }
        }
    }
    problems
}

/// Where the host facts are read from.
#[derive(Debug, Clone)]
pub struct HostFs {
    pub proc_route: PathBuf,
    pub sys_class_net: PathBuf,
    /// libvirt writes `<network>.macs` here when it defines a domain on a network, but creates
    /// the directory only when it starts a dnsmasq — which klab's networks never do.
    pub libvirt_dnsmasq: PathBuf,
    pub proc_arp: PathBuf,
}

impl Default for HostFs {
    fn default() -> Self {
        Self {
            proc_arp: "/proc/net/arp".into(),
            proc_route: "/proc/net/route".into(),
            sys_class_net: "/sys/class/net".into(),
            libvirt_dnsmasq: "/var/lib/libvirt/dnsmasq".into(),
        }
    }
}

/// The MAC the host's ARP table has for `ip` (a complete entry only), lower case.
pub fn parse_proc_arp(text: &str, ip: Ipv4Addr) -> Option<String> {
    let want = ip.to_string();
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // IP address, HW type, Flags (0x2 = complete), HW address, Mask, Device
        (f.len() >= 4 && f[0] == want && f[2] != "0x0" && f[3] != "00:00:00:00:00:00")
            .then(|| f[3].to_ascii_lowercase())
    })
}

/// PURE: the API VIP against the other labs on this host: another lab's VIP or node address, and
/// a VRRP router id two labs share on one layer-2 segment (their cluster networks bridge onto the
/// same host bridge). `(ok, message)` pairs; an equal router id on separate bridges is only a note.
pub fn vip_conflicts(plan: &LabPlan, others: &[LabPlan]) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let Some(k) = &plan.kubernetes else {
        return out;
    };
    let Some(vip) = k.control_plane_vip else {
        return out;
    };
    let id = crate::plan::provision::vrrp_router_id(&plan.lab);
    let bridge_of = |p: &LabPlan| {
        p.kubernetes
            .as_ref()
            .and_then(|k| p.network(&k.cluster_network))
            .filter(|n| n.mode == NetworkMode::Bridge)
            .map(|n| n.bridge.clone())
    };
    for o in others.iter().filter(|o| o.lab != plan.lab) {
        let Some(ok) = &o.kubernetes else { continue };
        if ok.control_plane_vip == Some(vip) {
            out.push((false, format!("VIP {vip} is also lab `{}`'s VIP", o.lab)));
        }
        if let Some(n) = o.nodes.iter().find(|n| n.nics.iter().any(|x| x.ip == vip)) {
            out.push((
                false,
                format!(
                    "VIP {vip} is node `{}`'s address in lab `{}`",
                    n.name, o.lab
                ),
            ));
        }
        if ok.control_plane_vip.is_some() && crate::plan::provision::vrrp_router_id(&o.lab) == id {
            match (bridge_of(plan), bridge_of(o)) {
                (Some(a), Some(b)) if a == b => out.push((
                    false,
                    format!(
                        "VRRP router id {id} is also lab `{}`'s, on the same host bridge `{a}`: keepalived would mix the two labs' VIPs; rename one lab (the id comes from the name)",
                        o.lab
                    ),
                )),
                _ => out.push((
                    true,
                    format!(
                        "VRRP router id {id} is also lab `{}`'s; harmless while their cluster networks stay on separate bridges",
                        o.lab
                    ),
                )),
            }
        }
    }
    out
}

impl HostFs {
    /// Whether something already answers on the VIP. Only asked when the host's route to it
    /// leaves through a local bridge that is not the lab's own, so no probe ever leaves this
    /// machine; `None` when that is not the case (nothing can be said without sending traffic out).
    pub fn vip_answers(&self, plan: &LabPlan) -> Option<Result<String, String>> {
        let k = plan.kubernetes.as_ref()?;
        let vip = k.control_plane_vip?;
        let own = plan.network(&k.cluster_network).map(|n| n.bridge.clone());
        let routes = self.routes();
        let r = route_for(&routes, vip)?;
        if r.net.prefix() == 0 || !self.bridge_exists(&r.iface) {
            return None;
        }
        if Some(&r.iface) == own.as_ref() {
            return Some(Ok(format!(
                "VIP {vip} is on the lab's own bridge `{}` (the lab is up)",
                r.iface
            )));
        }
        let probe = |port: u16| {
            match std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from((vip, port)),
                std::time::Duration::from_secs(1),
            ) {
                Ok(_) => true,
                // A refusal is an answer too: some host has that address.
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            }
        };
        if probe(crate::plan::API_PORT) || probe(22) {
            Some(Err(format!(
                "something already answers on VIP {vip} (through bridge `{}`); pick a free address for control-plane-vip",
                r.iface
            )))
        } else {
            Some(Ok(format!("nothing answers on VIP {vip}")))
        }
    }

    pub fn arp_mac(&self, ip: Ipv4Addr) -> Option<String> {
        std::fs::read_to_string(&self.proc_arp)
            .ok()
            .and_then(|t| parse_proc_arp(&t, ip))
    }

    pub fn routes(&self) -> Vec<HostRoute> {
        std::fs::read_to_string(&self.proc_route)
            .map(|t| parse_proc_routes(&t))
            .unwrap_or_default()
    }

    pub fn bridge_exists(&self, name: &str) -> bool {
        self.sys_class_net.join(name).join("bridge").exists()
    }

    /// `Err(problem)` when libvirt's dnsmasq directory is missing.
    pub fn dnsmasq_dir(&self) -> Result<(), String> {
        if self.libvirt_dnsmasq.is_dir() {
            Ok(())
        } else {
            Err(format!(
                "{} does not exist: libvirt creates it only when it starts a dnsmasq (klab's networks start none), and defining a domain then fails with `Failed to create file '…/kl-….macs.new'`; create it with `mkdir -p {}` or run scripts/setup-host.sh",
                self.libvirt_dnsmasq.display(),
                self.libvirt_dnsmasq.display()
            ))
        }
    }

    /// The checks `klab up` runs before creating anything (local `qemu:///system` only for the
    /// dnsmasq directory).
    pub fn preflight(&self, plan: &LabPlan, system_uri: bool) -> Result<(), Vec<String>> {
        let mut problems = clashes(plan, &self.routes(), &|b| self.bridge_exists(b));
        if system_uri && let Err(p) = self.dnsmasq_dir() {
            problems.push(p);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Before SSH to `addr`: the route must leave through `bridge` (the lab's bridge of NIC 1),
    /// so klab never sends its retries out of the host's default route.
    pub fn route_goes_through(&self, addr: Ipv4Addr, bridge: &str) -> Result<(), String> {
        let routes = self.routes();
        match route_for(&routes, addr) {
            Some(r) if r.iface == bridge => Ok(()),
            Some(r) => Err(format!(
                "the host's route to {addr} goes through `{}` ({}), not the lab's bridge `{bridge}`; klab does not send SSH there — is the lab's network active (`virsh net-list --all`)? `klab up` starts it",
                r.iface,
                if r.net.prefix() == 0 {
                    "the default route".to_string()
                } else {
                    r.net.to_string()
                }
            )),
            None => Err(format!(
                "the host has no route to {addr}; the lab's bridge `{bridge}` is down or gone — `klab up` restarts the lab's networks"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
kl-1234abcd\t00010A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    fn fs_with(routes: &str, dnsmasq: bool) -> (tempfile::TempDir, HostFs) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("route"), routes).unwrap();
        if dnsmasq {
            std::fs::create_dir(dir.path().join("dnsmasq")).unwrap();
        }
        let fs = HostFs {
            proc_route: dir.path().join("route"),
            sys_class_net: dir.path().join("net"),
            libvirt_dnsmasq: dir.path().join("dnsmasq"),
            proc_arp: dir.path().join("arp"),
        };
        (dir, fs)
    }

    #[test]
    fn vip_conflicts_name_the_other_lab() {
        use crate::plan::fixtures;
        let ha = crate::plan::plan(&fixtures::ha_lab(), &fixtures::inputs("ha"));
        let mut twin = ha.clone();
        twin.lab = "other".into();
        let found = vip_conflicts(&ha, std::slice::from_ref(&twin));
        assert!(
            found
                .iter()
                .any(|(ok, m)| !ok && m.contains("also lab `other`'s VIP")),
            "{found:?}"
        );
        // The same lab's own saved plan is no conflict.
        assert!(vip_conflicts(&ha, std::slice::from_ref(&ha)).is_empty());
        // A plain lab has no VIP to check.
        let plain = crate::plan::plan(&fixtures::plain_lab(), &fixtures::inputs("plain"));
        assert!(vip_conflicts(&plain, &[ha]).is_empty());
    }

    #[test]
    fn arp_entries_give_the_mac_of_complete_ones_only() {
        let arp = "IP address       HW type     Flags       HW address            Mask     Device\n\
                   10.232.2.100     0x1         0x2         52:54:00:AB:cd:01     *        kl-dc9ea96f\n\
                   10.232.2.101     0x1         0x0         00:00:00:00:00:00     *        kl-dc9ea96f\n";
        assert_eq!(
            parse_proc_arp(arp, "10.232.2.100".parse().unwrap()).as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        assert_eq!(parse_proc_arp(arp, "10.232.2.101".parse().unwrap()), None);
        assert_eq!(parse_proc_arp(arp, "10.232.2.1".parse().unwrap()), None);
    }

    #[test]
    fn proc_routes_parse_with_the_default_route() {
        let r = parse_proc_routes(ROUTES);
        let nets: Vec<String> = r.iter().map(|r| format!("{} {}", r.iface, r.net)).collect();
        assert_eq!(
            nets,
            vec![
                "eth0 0.0.0.0/0",
                "eth0 192.168.0.0/24",
                "kl-1234abcd 10.10.1.0/24"
            ]
        );
    }

    #[test]
    fn ssh_only_through_the_labs_bridge() {
        let (_d, fs) = fs_with(ROUTES, true);
        fs.route_goes_through("10.10.1.11".parse().unwrap(), "kl-1234abcd")
            .unwrap();
        let e = fs
            .route_goes_through("10.231.1.11".parse().unwrap(), "kl-1234abcd")
            .unwrap_err();
        assert!(
            e.starts_with("the host's route to 10.231.1.11 goes through `eth0` (the default route), not the lab's bridge `kl-1234abcd`"),
            "{e}"
        );
        let (_d, none) = fs_with("Iface\n", true);
        let e = none
            .route_goes_through("10.10.1.11".parse().unwrap(), "kl-1234abcd")
            .unwrap_err();
        assert!(e.starts_with("the host has no route to 10.10.1.11"), "{e}");
    }

    #[test]
    fn a_missing_dnsmasq_directory_is_refused_for_qemu_system_only() {
        let lab = crate::plan::fixtures::ha_lab();
        let plan = crate::plan::plan(&lab, &crate::plan::fixtures::inputs(&lab.name));
        let bridges = |fs: &HostFs| {
            for n in plan
                .networks
                .iter()
                .filter(|n| n.mode == NetworkMode::Bridge)
            {
                std::fs::create_dir_all(fs.sys_class_net.join(&n.bridge).join("bridge")).unwrap();
            }
        };
        let (_d, missing) = fs_with("Iface\n", false);
        bridges(&missing);
        let problems = missing.preflight(&plan, true).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("dnsmasq does not exist"),
            "{problems:?}"
        );
        assert!(problems[0].contains("mkdir -p "), "{problems:?}");
        missing.preflight(&plan, false).unwrap();
        let (_d, present) = fs_with("Iface\n", true);
        bridges(&present);
        present.preflight(&plan, true).unwrap();
    }
}
