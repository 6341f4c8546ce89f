//! `klab doctor`, and the host checks `klab up` runs before creating anything: libvirt reachable,
//! accelerators, permissions, host bridges present, and no subnet clashes with the host's routes.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;
use serde::Serialize;

use super::{CmdError, chain, resolve_uri};
use crate::cli::GlobalArgs;
use crate::exec::call;
use crate::model::NetworkMode;
use crate::output::Printer;
use crate::plan::LabPlan;

/// A route of the host, from /proc/net/route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub iface: String,
    pub net: Ipv4Network,
}

/// Parse /proc/net/route (hex, little-endian addresses). Default routes are skipped.
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
            if prefix == 0 {
                continue;
            }
            if let Ok(net) = Ipv4Network::new(dest, prefix) {
                out.push(HostRoute {
                    iface: f[0].to_string(),
                    net,
                });
            }
        }
    }
    out
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
                for r in routes {
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

fn host_bridge_exists(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .join("bridge")
        .exists()
}

/// The checks `klab up` runs before creating anything.
pub fn preflight_plan(plan: &LabPlan) -> Result<(), Vec<String>> {
    let routes = std::fs::read_to_string("/proc/net/route")
        .map(|t| parse_proc_routes(&t))
        .unwrap_or_default();
    let problems = clashes(plan, &routes, &host_bridge_exists);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[derive(Debug, Serialize)]
struct Check {
    check: String,
    ok: bool,
    detail: String,
}

pub async fn doctor(p: &Printer, g: &GlobalArgs, file: Option<&Path>) -> Result<(), CmdError> {
    let lab = match file {
        Some(f) => Some(super::load_lab(f)?),
        None => None,
    };
    let uri = resolve_uri(g, lab.as_ref());
    let mut checks = Vec::new();
    let mut push = |check: &str, ok: bool, detail: String| {
        checks.push(Check {
            check: check.to_string(),
            ok,
            detail,
        })
    };

    match super::up::connect(&uri).await {
        Ok(backend) => {
            push("libvirt", true, format!("connected to {uri}"));
            match call(&backend, |b| b.accel_support()).await {
                Ok(s) => {
                    push(
                        "accelerator",
                        s.kvm || s.qemu,
                        format!(
                            "KVM {}, QEMU/TCG {}{}",
                            if s.kvm { "offered" } else { "not offered" },
                            if s.qemu { "offered" } else { "not offered" },
                            if s.kvm {
                                "; if guests hang right after the kernel starts (nested virtualization), use --accel qemu"
                            } else {
                                ""
                            }
                        ),
                    );
                }
                Err(e) => push("accelerator", false, chain(&e)),
            }
        }
        Err(e) => push(
            "libvirt",
            false,
            format!(
                "{e}{}",
                e.hint().map(|h| format!(" — {h}")).unwrap_or_default()
            ),
        ),
    }
    push(
        "/dev/kvm",
        Path::new("/dev/kvm").exists(),
        if Path::new("/dev/kvm").exists() {
            "present".into()
        } else {
            "absent: guests run under TCG (slower)".into()
        },
    );

    // qemu runs as an unprivileged user under qemu:///system: image and pool paths must be reachable.
    let data = crate::paths::data_root();
    let mut cur = Some(data.as_path());
    let mut blocked = None;
    while let Some(dir) = cur {
        if let Ok(md) = std::fs::metadata(dir) {
            use std::os::unix::fs::PermissionsExt;
            if md.permissions().mode() & 0o001 == 0 {
                blocked = Some(dir.to_path_buf());
            }
        }
        cur = dir.parent();
    }
    push(
        "permissions",
        blocked.is_none(),
        match blocked {
            None => format!("{} is reachable by the qemu user", data.display()),
            Some(d) => format!(
                "{} is not searchable by others; qemu cannot read images below it (chmod o+x {} or set KLAB_DATA_DIR)",
                d.display(),
                d.display()
            ),
        },
    );
    for tool in ["debootstrap", "mkfs.ext4"] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        push(
            tool,
            true,
            if found {
                "found (for `klab image build`)".into()
            } else {
                "missing: only needed by `klab image build` (apt-get install debootstrap e2fsprogs)"
                    .into()
            },
        );
    }
    if let Some(lab) = &lab {
        let plan = crate::plan::plan(lab, &super::offline_inputs(lab, g));
        match preflight_plan(&plan) {
            Ok(()) => push(
                "lab networks",
                true,
                format!("no clashes for lab `{}`", lab.name),
            ),
            Err(problems) => push("lab networks", false, problems.join("; ")),
        }
    }

    let failed = checks.iter().filter(|c| !c.ok).count();
    if p.is_json() {
        p.json(&serde_json::json!({ "ok": failed == 0, "checks": checks }));
    } else {
        for c in &checks {
            p.line(format!(
                "{} {:<14} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.check,
                c.detail
            ));
        }
    }
    if failed > 0 {
        return Err(CmdError::user(
            format!("{failed} check(s) failed"),
            "fix the items marked FAIL; scripts/setup-host.sh installs and starts what klab needs on Debian",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
kl-1234abcd\t00010A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn proc_routes_parse_and_skip_the_default_route() {
        let r = parse_proc_routes(ROUTES);
        assert_eq!(
            r,
            vec![
                HostRoute {
                    iface: "eth0".into(),
                    net: "192.168.0.0/24".parse().unwrap()
                },
                HostRoute {
                    iface: "kl-1234abcd".into(),
                    net: "10.10.1.0/24".parse().unwrap()
                },
            ]
        );
    }
}
