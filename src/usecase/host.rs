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
}

impl Default for HostFs {
    fn default() -> Self {
        Self {
            proc_route: "/proc/net/route".into(),
            sys_class_net: "/sys/class/net".into(),
            libvirt_dnsmasq: "/var/lib/libvirt/dnsmasq".into(),
        }
    }
}

impl HostFs {
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
        };
        (dir, fs)
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
