//! PURE post-boot verification: does a node have exactly the network the plan promised?
//!
//! klab runs [`PROBE_COMMAND`] on the node and checks its output here: every NIC has its planned
//! MAC, name and address, the default route leaves through NIC 1 only, and the hostname is right.
//! A mismatch is an error, never a warning: a silently misconfigured second NIC is the classic way
//! lab clusters end up talking over the wrong network.

use std::net::Ipv4Addr;

use crate::plan::NodeSpec;

/// One command, sections separated by markers, so verification costs one round trip.
///
/// It starts with `sync`: what cloud-init wrote on the first boot (the pinned host key, the user's
/// key) is on disk once klab calls the node verified. A node restarted hard right after (a network
/// repair does that) kept zero-length key files otherwise, and its sshd never started again.
pub const PROBE_COMMAND: &str = "sync; echo @@hostname; hostname; echo @@link; ip -o link show; \
echo @@addr; ip -o -4 addr show; echo @@route; ip -4 route show default";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Probe {
    pub hostname: String,
    /// (ifname, mac)
    pub links: Vec<(String, String)>,
    /// (ifname, address, prefix)
    pub addrs: Vec<(String, Ipv4Addr, u8)>,
    /// (via, dev)
    pub default_routes: Vec<(Option<Ipv4Addr>, String)>,
}

pub fn parse_probe(out: &str) -> Probe {
    let mut p = Probe::default();
    let mut section = "";
    for line in out.lines() {
        let line = line.trim_end();
        if let Some(s) = line.strip_prefix("@@") {
            section = match s {
                "hostname" => "hostname",
                "link" => "link",
                "addr" => "addr",
                "route" => "route",
                _ => "",
            };
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        match section {
            "hostname" => p.hostname = line.trim().to_string(),
            "link" => {
                // `2: ext0: <…> mtu 1500 … link/ether 52:54:00:aa:bb:cc brd …`
                let mut it = line.split_whitespace();
                let name = it.nth(1).map(|n| n.trim_end_matches(':'));
                let name = name.map(|n| n.split('@').next().unwrap_or(n));
                let toks: Vec<&str> = line.split_whitespace().collect();
                let mac = toks
                    .iter()
                    .position(|t| *t == "link/ether")
                    .and_then(|i| toks.get(i + 1));
                if let (Some(name), Some(mac)) = (name, mac) {
                    p.links.push((name.to_string(), mac.to_ascii_lowercase()));
                }
            }
            "addr" => {
                // `2: ext0    inet 10.1.2.3/24 brd … scope global ext0\ …`
                let toks: Vec<&str> = line.split_whitespace().collect();
                if let (Some(name), Some(i)) = (toks.get(1), toks.iter().position(|t| *t == "inet"))
                    && let Some((ip, prefix)) = toks.get(i + 1).and_then(|c| c.split_once('/'))
                    && let (Ok(ip), Ok(prefix)) = (ip.parse(), prefix.parse())
                {
                    p.addrs.push((name.to_string(), ip, prefix));
                }
            }
            "route" => {
                let toks: Vec<&str> = line.split_whitespace().collect();
                if toks.first() != Some(&"default") {
                    continue;
                }
                let via = toks
                    .iter()
                    .position(|t| *t == "via")
                    .and_then(|i| toks.get(i + 1))
                    .and_then(|v| v.parse().ok());
                let dev = toks
                    .iter()
                    .position(|t| *t == "dev")
                    .and_then(|i| toks.get(i + 1))
                    .map(|d| d.to_string())
                    .unwrap_or_default();
                p.default_routes.push((via, dev));
            }
            _ => {}
        }
    }
    p
}

/// Every way the node differs from its plan; empty = verified.
pub fn check(node: &NodeSpec, probe: &Probe) -> Vec<String> {
    let mut problems = Vec::new();
    if probe.hostname != node.name {
        problems.push(format!(
            "hostname is `{}`, planned `{}`",
            probe.hostname, node.name
        ));
    }
    for nic in &node.nics {
        match probe.links.iter().find(|(_, mac)| mac == &nic.mac) {
            None => problems.push(format!(
                "no interface with MAC {} (NIC on network `{}`)",
                nic.mac, nic.network
            )),
            Some((name, _)) if name != &nic.ifname => problems.push(format!(
                "interface with MAC {} is named `{name}`, planned `{}`",
                nic.mac, nic.ifname
            )),
            Some(_) => {}
        }
        let on_if: Vec<_> = probe
            .addrs
            .iter()
            .filter(|(n, _, _)| n == &nic.ifname)
            .collect();
        if !on_if
            .iter()
            .any(|(_, ip, prefix)| *ip == nic.ip && *prefix == nic.prefix)
        {
            let have = on_if
                .iter()
                .map(|(_, ip, p)| format!("{ip}/{p}"))
                .collect::<Vec<_>>();
            problems.push(format!(
                "`{}` should have {}/{}, has {}",
                nic.ifname,
                nic.ip,
                nic.prefix,
                if have.is_empty() {
                    "no IPv4 address".to_string()
                } else {
                    have.join(", ")
                }
            ));
        }
    }
    let primary = node.nics.first();
    let expected: Vec<(Option<Ipv4Addr>, String)> = primary
        .and_then(|n| n.gateway.map(|gw| (Some(gw), n.ifname.clone())))
        .into_iter()
        .collect();
    if probe.default_routes != expected {
        let show = |r: &[(Option<Ipv4Addr>, String)]| {
            if r.is_empty() {
                "none".to_string()
            } else {
                r.iter()
                    .map(|(via, dev)| match via {
                        Some(v) => format!("via {v} dev {dev}"),
                        None => format!("dev {dev}"),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        };
        problems.push(format!(
            "default route should be {} (NIC 1 only), is {}",
            show(&expected),
            show(&probe.default_routes)
        ));
    }
    problems
}

/// Waits for cloud-init's final stage without running Python in the guest (its import alone costs
/// seconds of guest CPU under TCG, competing with cloud-init itself): `result.json` is written at
/// the end of the last stage, on tmpfs, so it also means "this boot". Then it prints the same files
/// `cloud-init status` reads.
pub const CLOUD_INIT_WAIT_COMMAND: &str = "while [ ! -e /run/cloud-init/result.json ]; do sleep 0.5; done; \
echo @@result; cat /run/cloud-init/result.json; echo; echo @@status; cat /run/cloud-init/status.json 2>/dev/null; echo";

/// cloud-init's verdict, as `cloud-init status` would give it: done, done with recoverable errors
/// (exit 2 on recent versions: warn and go on), or failed (exit 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudInitOutcome {
    Done,
    Warnings(Vec<String>),
    Failed(Vec<String>),
}

pub fn parse_cloud_init(out: &str) -> CloudInitOutcome {
    let section = |name: &str| -> Option<serde_json::Value> {
        let start = out.find(&format!("@@{name}"))? + name.len() + 2;
        let rest = &out[start..];
        let end = rest.find("\n@@").unwrap_or(rest.len());
        serde_json::from_str(rest[..end].trim()).ok()
    };
    let Some(result) = section("result") else {
        return CloudInitOutcome::Failed(vec![
            "cloud-init finished but /run/cloud-init/result.json is not valid JSON".into(),
        ]);
    };
    let strings = |v: Option<&serde_json::Value>| -> Vec<String> {
        v.and_then(|e| e.as_array())
            .map(|a| {
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let errors = strings(result.pointer("/v1/errors"));
    if !errors.is_empty() {
        return CloudInitOutcome::Failed(errors);
    }
    // Newer cloud-init records per-stage recoverable errors (`{"WARNING": ["…"]}`) in status.json.
    let mut warnings = Vec::new();
    if let Some(stages) = section("status").and_then(|s| s.get("v1").cloned())
        && let Some(stages) = stages.as_object()
    {
        for (stage, v) in stages {
            if let Some(rec) = v.get("recoverable_errors").and_then(|r| r.as_object()) {
                for (level, msgs) in rec {
                    for m in strings(Some(msgs)) {
                        warnings.push(format!("{stage}: {level}: {m}"));
                    }
                }
            }
        }
    }
    if warnings.is_empty() {
        CloudInitOutcome::Done
    } else {
        CloudInitOutcome::Warnings(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;
    use crate::plan::{NicSpec, VolumeFormat, VolumeSpec};

    const OUT: &str = "@@hostname\nn1\n@@link\n\
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
2: ext0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc pfifo_fast state UP mode DEFAULT group default qlen 1000\\    link/ether 52:54:00:aa:00:01 brd ff:ff:ff:ff:ff:ff\n\
3: lab0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc pfifo_fast state UP mode DEFAULT group default qlen 1000\\    link/ether 52:54:00:aa:00:02 brd ff:ff:ff:ff:ff:ff\n\
@@addr\n\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
2: ext0    inet 10.231.1.10/24 brd 10.231.1.255 scope global ext0\\       valid_lft forever preferred_lft forever\n\
3: lab0    inet 10.231.2.10/24 brd 10.231.2.255 scope global lab0\\       valid_lft forever preferred_lft forever\n\
@@route\ndefault via 10.231.1.1 dev ext0 proto static\n";

    fn nic(ifname: &str, mac: &str, ip: [u8; 4], gw: Option<[u8; 4]>) -> NicSpec {
        NicSpec {
            network: ifname.into(),
            libvirt_network: ifname.into(),
            ifname: ifname.into(),
            mac: mac.into(),
            ip: ip.into(),
            prefix: 24,
            gateway: gw.map(Into::into),
            dns: vec![],
            mtu: None,
        }
    }

    fn node() -> NodeSpec {
        let vol = VolumeSpec {
            name: String::new(),
            path: String::new(),
            format: VolumeFormat::Raw,
            capacity_bytes: 0,
            backing: None,
        };
        NodeSpec {
            name: "n1".into(),
            role: Role::None,
            domain: "klab-t-n1".into(),
            cpus: 1,
            memory_mib: 1024,
            image: "debian-12".into(),
            user: "klab".into(),
            overlay: vol.clone(),
            seed: vol,
            nics: vec![
                nic(
                    "ext0",
                    "52:54:00:aa:00:01",
                    [10, 231, 1, 10],
                    Some([10, 231, 1, 1]),
                ),
                nic("lab0", "52:54:00:aa:00:02", [10, 231, 2, 10], None),
            ],
            ssh_address: [10, 231, 1, 10].into(),
            cluster_ip: [10, 231, 2, 10].into(),
            console_log: String::new(),
            instance_id: String::new(),
        }
    }

    #[test]
    fn cloud_init_outcomes() {
        let done = "@@result\n{\"v1\": {\"datasource\": \"DataSourceNoCloud\", \"errors\": []}}\n\n@@status\n{\"v1\": {\"init\": {\"errors\": []}, \"stage\": null}}\n";
        assert_eq!(parse_cloud_init(done), CloudInitOutcome::Done);
        let failed = "@@result\n{\"v1\": {\"errors\": [\"('ssh', KeyError('x'))\"]}}\n@@status\n\n";
        assert_eq!(
            parse_cloud_init(failed),
            CloudInitOutcome::Failed(vec!["('ssh', KeyError('x'))".into()])
        );
        let warned = "@@result\n{\"v1\": {\"errors\": []}}\n@@status\n{\"v1\": {\"modules-final\": {\"recoverable_errors\": {\"WARNING\": [\"deprecated key\"]}}}}\n";
        assert_eq!(
            parse_cloud_init(warned),
            CloudInitOutcome::Warnings(vec!["modules-final: WARNING: deprecated key".into()])
        );
        assert!(matches!(
            parse_cloud_init("@@result\ngarbage"),
            CloudInitOutcome::Failed(_)
        ));
    }

    #[test]
    fn a_node_as_planned_passes() {
        let p = parse_probe(OUT);
        assert_eq!(p.links.len(), 2, "{p:?}");
        assert_eq!(p.addrs.len(), 3);
        assert_eq!(check(&node(), &p), Vec::<String>::new());
    }

    #[test]
    fn every_deviation_is_reported() {
        let bad = OUT
            .replace("\nn1\n", "\ndebian\n")
            .replace("inet 10.231.2.10/24", "inet 10.231.2.99/24")
            .replace("52:54:00:aa:00:02", "52:54:00:ff:ff:ff")
            .replace(
                "default via 10.231.1.1 dev ext0 proto static\n",
                "default via 10.231.1.1 dev ext0 proto static\ndefault via 10.231.2.1 dev lab0\n",
            );
        let problems = check(&node(), &parse_probe(&bad));
        assert_eq!(
            problems,
            vec![
                "hostname is `debian`, planned `n1`".to_string(),
                "no interface with MAC 52:54:00:aa:00:02 (NIC on network `lab0`)".to_string(),
                "`lab0` should have 10.231.2.10/24, has 10.231.2.99/24".to_string(),
                "default route should be via 10.231.1.1 dev ext0 (NIC 1 only), is via 10.231.1.1 dev ext0; via 10.231.2.1 dev lab0".to_string(),
            ]
        );
    }

    #[test]
    fn missing_default_route_and_address_are_errors() {
        let bad = OUT
            .replace("default via 10.231.1.1 dev ext0 proto static\n", "")
            .replace("2: ext0    inet 10.231.1.10/24 brd 10.231.1.255 scope global ext0\\       valid_lft forever preferred_lft forever\n", "");
        let problems = check(&node(), &parse_probe(&bad));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("`ext0` should have 10.231.1.10/24, has no IPv4 address"));
        assert!(problems[1].contains("is none"));
    }
}
