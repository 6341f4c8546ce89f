//! PURE planning core: validated lab + explicit inputs → `LabPlan`. No I/O, no clock, no randomness.

#[doc(hidden)]
pub mod fixtures;
pub mod ipam;
pub mod mac;
pub mod names;
pub mod provision;
pub mod secret;
pub mod steps;
pub mod types;
pub mod versions;

pub use types::*;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::model::{ImageSource, Lab, NetworkMode, Node, Role};

/// Kubernetes API server port (kubeadm's default).
pub const API_PORT: u16 = 6443;
/// Interface name of the cluster NIC in every guest of a Kubernetes lab.
pub const CLUSTER_IFNAME: &str = "lab0";
const GIB: u64 = 1024 * 1024 * 1024;

/// Plan a validated lab. Pure, deterministic and total: the same lab and inputs give the same plan.
pub fn plan(lab: &Lab, inputs: &PlanInputs) -> LabPlan {
    let pool = plan_pool(lab, inputs);
    let networks: Vec<NetworkSpec> = lab.networks.iter().map(|n| plan_network(lab, n)).collect();
    let images = plan_images(lab, inputs);
    let cluster_network = lab.kubernetes.as_ref().map(|k| k.cluster_network.as_str());

    let mut nodes: Vec<NodeSpec> = lab
        .nodes
        .iter()
        .map(|n| plan_node(lab, inputs, n, &networks, &images, &pool, cluster_network))
        .collect();

    let hosts = plan_hosts(lab, &nodes);
    let timeouts = provision::PhaseTimeouts {
        command: lab.timeouts.command,
        nodes_ready: lab.timeouts.nodes_ready,
    };
    let kubernetes = lab.kubernetes.as_ref().map(|k| {
        let mut spec = plan_kubernetes(k, &nodes);
        spec.provision = provision::provision_plan(&lab.name, &spec, &nodes, timeouts);
        spec
    });
    let steps = kubernetes
        .as_ref()
        .map(|k| steps::summary(&k.provision))
        .unwrap_or_default();

    // The instance-id covers everything the node's seed is rendered from, so it is computed last.
    // Hosts are shared by every seed: hash them once, not once per node.
    let hosts_hash =
        names::sha256_hex(serde_json::to_string(&hosts).unwrap_or_default().as_bytes());
    for node in &mut nodes {
        node.instance_id = instance_id(node, &hosts_hash, inputs.keys.as_ref());
    }

    LabPlan {
        lab: lab.name.clone(),
        prefix: names::prefix(&lab.name),
        uri: inputs.uri.clone(),
        accel: inputs.accel,
        owner: Ownership {
            namespace: OWNER_NS.to_string(),
            lab: lab.name.clone(),
        },
        pool,
        networks,
        images,
        nodes,
        hosts,
        kubernetes,
        steps,
    }
}

/// Every lab has its own pool (`klab-<lab>`): volume names are not lab-prefixed, so a pool shared
/// between labs could not tell whose volumes are whose.
fn plan_pool(lab: &Lab, inputs: &PlanInputs) -> PoolSpec {
    PoolSpec {
        name: names::pool_name(&lab.name),
        path: inputs.pool_dir.clone(),
    }
}

fn plan_network(lab: &Lab, n: &crate::model::Network) -> NetworkSpec {
    let (bridge, host_ip) = match n.mode {
        NetworkMode::Nat | NetworkMode::Isolated => {
            (names::bridge_name(&lab.name, &n.name), Some(n.gateway))
        }
        NetworkMode::Bridge => (n.bridge.clone().unwrap_or_default(), None),
    };
    // NAT networks run libvirt's DNS forwarder on the gateway; the others need explicit servers.
    let dns = if n.dns.is_empty() && n.mode == NetworkMode::Nat {
        vec![n.gateway]
    } else {
        n.dns.clone()
    };
    let seed = names::sha256_hex(format!("{}/{}", lab.name, n.name).as_bytes());
    NetworkSpec {
        key: n.name.clone(),
        name: names::network_name(&lab.name, &n.name),
        mode: n.mode,
        bridge,
        address: n.cidr.network(),
        prefix: n.cidr.prefix(),
        netmask: n.cidr.mask(),
        host_ip,
        gateway: n.gateway,
        dns,
        mtu: n.mtu,
        mac_seed: seed[..2].to_string(),
    }
}

fn plan_images(lab: &Lab, inputs: &PlanInputs) -> Vec<ImageSpec> {
    lab.images
        .iter()
        .map(|(key, img)| {
            let local = inputs.local_images.iter().find(|l| &l.key == key);
            let path_str = |p: &std::path::PathBuf| p.to_string_lossy().into_owned();
            let (base_path, url, sha256) = match (local, &img.source) {
                (Some(l), _) => (l.path.clone(), None, None),
                (None, ImageSource::Url { url, sha256 }) => (
                    names::join_path(&inputs.image_cache, &format!("{key}.qcow2")),
                    Some(url.clone()),
                    Some(sha256.clone()),
                ),
                (None, ImageSource::Path { path }) => (path_str(path), None, None),
            };
            let (kernel, initrd, cmdline) = match local {
                Some(l) => (l.kernel.clone(), l.initrd.clone(), l.cmdline.clone()),
                None => (
                    img.kernel.as_ref().map(path_str),
                    img.initrd.as_ref().map(path_str),
                    img.cmdline.clone(),
                ),
            };
            // Direct kernel boot bypasses the image's bootloader; `ds=nocloud` makes cloud-init use the seed.
            let cmdline = kernel.as_ref().map(|_| with_nocloud(cmdline.as_deref()));
            ImageSpec {
                key: key.clone(),
                family: img.family,
                base_path,
                url,
                sha256,
                kernel,
                initrd,
                cmdline,
            }
        })
        .collect()
}

fn with_nocloud(cmdline: Option<&str>) -> String {
    match cmdline.map(str::trim) {
        None | Some("") => "ds=nocloud".to_string(),
        Some(c) if c.split_whitespace().any(|w| w.starts_with("ds=nocloud")) => c.to_string(),
        Some(c) => format!("{c} ds=nocloud"),
    }
}

fn plan_node(
    lab: &Lab,
    inputs: &PlanInputs,
    node: &Node,
    networks: &[NetworkSpec],
    images: &[ImageSpec],
    pool: &PoolSpec,
    cluster_network: Option<&str>,
) -> NodeSpec {
    let domain = names::domain_name(&lab.name, &node.name);
    let nics: Vec<NicSpec> = node
        .nics
        .iter()
        .enumerate()
        .map(|(i, nic)| {
            let net = networks.iter().find(|n| n.key == nic.network);
            let first = i == 0;
            NicSpec {
                network: nic.network.clone(),
                libvirt_network: names::network_name(&lab.name, &nic.network),
                ifname: names::ifname(i, cluster_network == Some(nic.network.as_str())),
                mac: mac::mac(&lab.name, &node.name, i),
                ip: nic.ip,
                prefix: net.map(|n| n.prefix).unwrap_or(32),
                gateway: net.filter(|_| first).map(|n| n.gateway),
                dns: net
                    .filter(|_| first)
                    .map(|n| n.dns.clone())
                    .unwrap_or_default(),
                mtu: net.and_then(|n| n.mtu),
            }
        })
        .collect();
    let ssh_address = nics.first().map(|n| n.ip).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let cluster_ip = cluster_network
        .and_then(|c| nics.iter().find(|n| n.network == c))
        .map(|n| n.ip)
        .unwrap_or(ssh_address);
    let backing = images
        .iter()
        .find(|i| i.key == node.image)
        .map(|i| i.base_path.clone());
    let overlay_name = names::overlay_volume(&node.name);
    let seed_name = names::seed_volume(&node.name);
    NodeSpec {
        name: node.name.clone(),
        role: node.role,
        domain: domain.clone(),
        cpus: node.cpus,
        memory_mib: node.memory_mib,
        image: node.image.clone(),
        user: node.user.clone(),
        overlay: VolumeSpec {
            path: names::join_path(&pool.path, &overlay_name),
            name: overlay_name,
            format: VolumeFormat::Qcow2,
            capacity_bytes: node.disk_gib.saturating_mul(GIB),
            backing,
        },
        seed: VolumeSpec {
            path: names::join_path(&pool.path, &seed_name),
            name: seed_name,
            format: VolumeFormat::Raw,
            capacity_bytes: 0,
            backing: None,
        },
        nics,
        ssh_address,
        cluster_ip,
        console_log: names::join_path(&inputs.console_dir, &format!("{domain}.log")),
        instance_id: String::new(),
    }
}

/// Every node's cluster address → its name, plus the VIP; sorted by address, names merged per address.
fn plan_hosts(lab: &Lab, nodes: &[NodeSpec]) -> Vec<HostEntry> {
    let mut by_ip: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for n in nodes {
        by_ip.entry(n.cluster_ip).or_default().push(n.name.clone());
    }
    if let Some(vip) = lab.kubernetes.as_ref().and_then(|k| k.control_plane_vip) {
        let names = by_ip.entry(vip).or_default();
        names.push(format!("{}-api", lab.name));
        names.push("k8s-api".to_string());
    }
    by_ip
        .into_iter()
        .map(|(ip, names)| HostEntry { ip, names })
        .collect()
}

fn plan_kubernetes(k: &crate::model::Kubernetes, nodes: &[NodeSpec]) -> KubernetesSpec {
    let with_role =
        |role: Role| -> Vec<&NodeSpec> { nodes.iter().filter(|n| n.role == role).collect() };
    let cps = with_role(Role::ControlPlane);
    let workers = with_role(Role::Worker);
    let init = cps.first();
    let endpoint_ip = k
        .control_plane_vip
        .or(init.map(|n| n.cluster_ip))
        .unwrap_or(Ipv4Addr::UNSPECIFIED);

    let mut sans: Vec<String> = Vec::new();
    let mut add = |s: String| {
        if !sans.contains(&s) {
            sans.push(s);
        }
    };
    if let Some(vip) = k.control_plane_vip {
        add(vip.to_string());
    }
    for cp in &cps {
        add(cp.cluster_ip.to_string());
        add(cp.name.clone());
    }
    add("127.0.0.1".to_string());

    let patch_version = crate::plan::versions::K8sVersion::parse(&k.version)
        .filter(|v| v.patch.is_some())
        .map(|v| v.to_string());
    KubernetesSpec {
        version: k.version.clone(),
        patch_version,
        minor: minor_of(&k.version),
        cluster_network: k.cluster_network.clone(),
        cluster_ifname: CLUSTER_IFNAME.to_string(),
        pod_cidr: k.pod_cidr.to_string(),
        service_cidr: k.service_cidr.to_string(),
        control_plane_endpoint: format!("{endpoint_ip}:{API_PORT}"),
        control_plane_vip: k.control_plane_vip,
        init_node: init.map(|n| n.name.clone()).unwrap_or_default(),
        control_planes: cps.iter().map(|n| n.name.clone()).collect(),
        workers: workers.iter().map(|n| n.name.clone()).collect(),
        cert_sans: sans,
        calico_version: k.calico_version.clone(),
        calico_autodetect: provision::CALICO_AUTODETECT.to_string(),
        encapsulation: k.encapsulation,
        package_repo: k
            .package_repo
            .clone()
            .unwrap_or_else(|| crate::model::defaults::PACKAGE_REPO.to_string()),
        package_key: k.package_key.clone(),
        image_repository: k.image_repository.clone(),
        calico_manifest: k
            .calico_manifest
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        provision: Default::default(),
    }
}

/// `1.32.5` → `v1.32`; `1.32` → `v1.32`.
fn minor_of(version: &str) -> String {
    let v = version.trim_start_matches('v');
    let mut parts = v.split('.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("v{major}.{minor}"),
        _ => format!("v{v}"),
    }
}

/// What the node's seed is rendered from (public data only).
#[derive(Serialize)]
struct SeedInputs<'a> {
    name: &'a str,
    domain: &'a str,
    user: &'a str,
    nics: &'a [NicSpec],
    hosts_hash: &'a str,
    user_public_key: Option<&'a str>,
    host_public_key: Option<&'a str>,
}

fn instance_id(node: &NodeSpec, hosts_hash: &str, keys: Option<&KeyMaterial>) -> String {
    let host_key = keys.and_then(|k| {
        k.host_keys
            .iter()
            .find(|(n, _)| *n == node.name)
            .map(|(_, h)| h.public_openssh.as_str())
    });
    let inputs = SeedInputs {
        name: &node.name,
        domain: &node.domain,
        user: &node.user,
        nics: &node.nics,
        hosts_hash,
        user_public_key: keys.map(|k| k.user_public_key.as_str()),
        host_public_key: host_key,
    };
    // Serializing plain data (strings, addresses, numbers) cannot fail; fall back to the Debug form anyway.
    let data = serde_json::to_vec(&inputs).unwrap_or_else(|_| format!("{:?}", node).into_bytes());
    let hash = names::sha256_hex(&data);
    format!("{}-{}", node.domain, &hash[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Accel;

    fn ha() -> (Lab, LabPlan) {
        let lab = fixtures::ha_lab();
        let p = plan(&lab, &fixtures::inputs(&lab.name));
        (lab, p)
    }

    fn ids(p: &LabPlan) -> Vec<&str> {
        p.steps.iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn names_paths_and_ownership_follow_conventions() {
        let (_, p) = ha();
        assert_eq!(p.prefix, "klab-demo");
        assert_eq!(p.owner.namespace, OWNER_NS);
        assert_eq!(p.accel, Accel::Auto);
        assert_eq!(
            p.pool,
            PoolSpec {
                name: "klab-demo".into(),
                path: "/var/lib/klab/pools/demo".into(),
            }
        );
        let cp1 = p.node("cp1").expect("cp1");
        assert_eq!(cp1.domain, "klab-demo-cp1");
        assert_eq!(cp1.overlay.name, "cp1.qcow2");
        assert_eq!(cp1.overlay.path, "/var/lib/klab/pools/demo/cp1.qcow2");
        assert_eq!(cp1.overlay.capacity_bytes, 20 * GIB);
        assert_eq!(cp1.overlay.format, VolumeFormat::Qcow2);
        assert_eq!(
            cp1.overlay.backing.as_deref(),
            Some("/var/lib/klab/images/debian-12.qcow2")
        );
        assert_eq!(cp1.seed.name, "cp1-seed.img");
        assert_eq!(cp1.seed.format, VolumeFormat::Raw);
        assert_eq!(cp1.console_log, "/var/lib/klab/console/klab-demo-cp1.log");
        let cluster = p.network("cluster").expect("cluster");
        assert_eq!(cluster.name, "klab-demo-cluster");
        assert_eq!(cluster.bridge, "kl-e50b38c9");
        assert_eq!(cluster.host_ip, Some(Ipv4Addr::new(10, 10, 1, 1)));
        assert_eq!(cluster.netmask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            (cluster.address, cluster.prefix),
            (Ipv4Addr::new(10, 10, 1, 0), 24)
        );
        let lan = p.network("lan").expect("lan");
        assert_eq!((lan.bridge.as_str(), lan.host_ip), ("br0", None));
    }

    #[test]
    fn nics_get_ifnames_macs_and_only_nic1_routes() {
        let (_, p) = ha();
        let w1 = p.node("w1").expect("w1");
        let ifnames: Vec<&str> = w1.nics.iter().map(|n| n.ifname.as_str()).collect();
        assert_eq!(ifnames, ["ext0", "lab0", "net2"]);
        assert_eq!(w1.nics[0].mac, "52:54:00:80:11:24");
        assert_eq!(w1.nics[0].libvirt_network, "klab-demo-outside");
        assert_eq!(w1.nics[0].gateway, Some(Ipv4Addr::new(192, 168, 150, 1)));
        // NAT without explicit DNS: libvirt's forwarder on the gateway.
        assert_eq!(w1.nics[0].dns, vec![Ipv4Addr::new(192, 168, 150, 1)]);
        assert_eq!(w1.nics[0].mtu, Some(1500));
        for nic in &w1.nics[1..] {
            assert_eq!(nic.gateway, None);
            assert!(nic.dns.is_empty());
        }
        assert_eq!(w1.nics[1].mtu, Some(1450));
        assert_eq!(w1.ssh_address, Ipv4Addr::new(192, 168, 150, 20));
        assert_eq!(w1.cluster_ip, Ipv4Addr::new(10, 10, 1, 20));
        let macs: std::collections::BTreeSet<&str> = p
            .nodes
            .iter()
            .flat_map(|n| n.nics.iter().map(|x| x.mac.as_str()))
            .collect();
        assert_eq!(
            macs.len(),
            p.nodes.iter().map(|n| n.nics.len()).sum::<usize>()
        );
    }

    #[test]
    fn plain_lab_uses_nic1_and_its_own_pool() {
        let lab = fixtures::plain_lab();
        let p = plan(&lab, &fixtures::inputs(&lab.name));
        assert_eq!(
            p.pool,
            PoolSpec {
                name: "klab-plain".into(),
                path: "/var/lib/klab/pools/plain".into(),
            }
        );
        let vm1 = p.node("vm1").expect("vm1");
        assert_eq!(vm1.overlay.path, "/var/lib/klab/pools/plain/vm1.qcow2");
        assert_eq!(vm1.cluster_ip, Ipv4Addr::new(192, 168, 182, 30));
        let ifnames: Vec<&str> = vm1.nics.iter().map(|n| n.ifname.as_str()).collect();
        assert_eq!(ifnames, ["ext0", "net1"]);
        // Bridge network: the configured servers, gateway from the lab file.
        assert_eq!(vm1.nics[0].dns.len(), 2);
        assert_eq!(vm1.nics[0].gateway, Some(Ipv4Addr::new(192, 168, 182, 1)));
        assert!(p.kubernetes.is_none());
        assert!(p.steps.is_empty());
        let hosts: Vec<(Ipv4Addr, Vec<String>)> =
            p.hosts.iter().map(|h| (h.ip, h.names.clone())).collect();
        assert_eq!(
            hosts,
            vec![
                (Ipv4Addr::new(192, 168, 182, 30), vec!["vm1".to_string()]),
                (Ipv4Addr::new(192, 168, 182, 31), vec!["vm2".to_string()]),
            ]
        );
    }

    #[test]
    fn hosts_cover_every_node_and_the_vip_sorted_by_address() {
        let (lab, p) = ha();
        assert_eq!(p.hosts.len(), lab.nodes.len() + 1);
        let ips: Vec<Ipv4Addr> = p.hosts.iter().map(|h| h.ip).collect();
        let mut sorted = ips.clone();
        sorted.sort();
        assert_eq!(ips, sorted);
        let vip = p.hosts.last().expect("vip entry");
        assert_eq!(vip.ip, Ipv4Addr::new(10, 10, 1, 100));
        assert_eq!(vip.names, ["demo-api", "k8s-api"]);
    }

    #[test]
    fn kubernetes_spec_for_ha() {
        let (_, p) = ha();
        let k = p.kubernetes.as_ref().expect("kubernetes");
        assert_eq!(k.minor, "v1.36");
        assert_eq!(k.patch_version, None);
        assert_eq!(k.package_repo, "https://pkgs.k8s.io/core:/stable:");
        assert_eq!(k.control_plane_endpoint, "10.10.1.100:6443");
        assert_eq!(k.init_node, "cp1");
        assert_eq!(k.control_planes, ["cp1", "cp2", "cp3"]);
        assert_eq!(k.workers, ["w1", "w2"]);
        assert_eq!(
            k.cert_sans,
            [
                "10.10.1.100",
                "10.10.1.10",
                "cp1",
                "10.10.1.11",
                "cp2",
                "10.10.1.12",
                "cp3",
                "127.0.0.1"
            ]
        );
        assert_eq!(k.cluster_ifname, "lab0");
        assert_eq!(k.calico_autodetect, "kubernetes-internal-ip");
        assert_eq!(k.pod_cidr, "10.244.0.0/16");
        assert_eq!(
            ids(&p),
            [
                "detect-os",
                "preflight",
                "package-repo",
                "resolve-version",
                "kubernetes-packages",
                "containerd",
                "vip",
                "kubeadm-init",
                "join-credentials",
                "join-control-plane",
                "join-workers",
                "calico",
                "wait-ready",
                "kubeconfig",
                "verify"
            ]
        );
        let step = |id: &str| p.steps.iter().find(|s| s.id == id).expect(id);
        let join_cp = step("join-control-plane");
        assert_eq!(
            (join_cp.nodes.as_slice(), join_cp.serial),
            (&["cp2".to_string(), "cp3".to_string()][..], true)
        );
        assert!(!step("preflight").serial);
        assert_eq!(step("preflight").nodes.len(), 5);
        assert_eq!(step("vip").nodes, ["cp1", "cp2", "cp3"]);
        assert_eq!(step("resolve-version").nodes, ["cp1"]);
        let w = step("join-workers");
        assert_eq!(
            (w.nodes.as_slice(), w.serial),
            (&["w1".to_string(), "w2".to_string()][..], false)
        );
    }

    #[test]
    fn plans_saved_before_the_provisioner_still_load() {
        let (_, p) = ha();
        let mut json = serde_json::to_value(&p).expect("json");
        let k = json["kubernetes"].as_object_mut().expect("kubernetes");
        for key in [
            "patch_version",
            "encapsulation",
            "package_repo",
            "package_key",
            "image_repository",
            "calico_manifest",
            "provision",
        ] {
            k.remove(key);
        }
        let old: LabPlan = serde_json::from_value(json).expect("old plan loads");
        let k = old.kubernetes.expect("kubernetes");
        assert!(k.provision.phases.is_empty());
        assert_eq!(k.package_repo, "");
    }

    #[test]
    fn single_control_plane_without_vip() {
        let lab = fixtures::generated_lab(3);
        let p = plan(&lab, &fixtures::inputs(&lab.name));
        let k = p.kubernetes.as_ref().expect("kubernetes");
        let cp1 = p.node("cp1").expect("cp1");
        assert_eq!(k.control_plane_endpoint, format!("{}:6443", cp1.cluster_ip));
        assert_eq!(
            k.cert_sans,
            [cp1.cluster_ip.to_string(), "cp1".into(), "127.0.0.1".into()]
        );
        assert!(!ids(&p).contains(&"vip"));
        assert!(!ids(&p).contains(&"join-control-plane"));
        assert!(ids(&p).contains(&"join-workers"));
        assert_eq!(minor_of("1.31.4"), "v1.31");
        assert_eq!(minor_of("v1.30"), "v1.30");
    }

    #[test]
    fn images_resolve_cache_paths_local_builds_and_nocloud() {
        let lab = fixtures::ha_lab();
        let mut inputs = fixtures::inputs(&lab.name);
        let p = plan(&lab, &inputs);
        let deb = p
            .images
            .iter()
            .find(|i| i.key == "debian-12")
            .expect("debian");
        assert_eq!(deb.base_path, "/var/lib/klab/images/debian-12.qcow2");
        assert!(deb.url.is_some() && deb.kernel.is_none() && deb.cmdline.is_none());
        let custom = p.images.iter().find(|i| i.key == "custom").expect("custom");
        assert_eq!(custom.base_path, "/var/lib/klab/images/custom.qcow2");
        assert_eq!(
            custom.cmdline.as_deref(),
            Some("root=/dev/vda rw console=ttyS0 ds=nocloud")
        );

        inputs.local_images.push(LocalImage {
            key: "debian-12".into(),
            path: "/cache/debian-12-local.qcow2".into(),
            kernel: Some("/cache/vmlinuz".into()),
            initrd: Some("/cache/initrd".into()),
            cmdline: Some("root=/dev/vda rw ds=nocloud;s=x".into()),
        });
        let p = plan(&lab, &inputs);
        let deb = p
            .images
            .iter()
            .find(|i| i.key == "debian-12")
            .expect("debian");
        assert_eq!(deb.base_path, "/cache/debian-12-local.qcow2");
        assert_eq!(
            (deb.url.as_deref(), deb.kernel.as_deref()),
            (None, Some("/cache/vmlinuz"))
        );
        assert_eq!(
            deb.cmdline.as_deref(),
            Some("root=/dev/vda rw ds=nocloud;s=x")
        );
        assert_eq!(
            p.node("cp1").and_then(|n| n.overlay.backing.as_deref()),
            Some("/cache/debian-12-local.qcow2")
        );
        assert_eq!(with_nocloud(None), "ds=nocloud");
        assert_eq!(with_nocloud(Some("  ")), "ds=nocloud");
    }

    #[test]
    fn instance_id_tracks_seed_inputs() {
        let lab = fixtures::ha_lab();
        let mut inputs = fixtures::inputs(&lab.name);
        let a = plan(&lab, &inputs);
        let id = &a.node("cp1").expect("cp1").instance_id;
        assert!(id.starts_with("klab-demo-cp1-"));
        assert_eq!(id.len(), "klab-demo-cp1-".len() + 12);
        assert!(
            id["klab-demo-cp1-".len()..]
                .chars()
                .all(|c| c.is_ascii_hexdigit())
        );
        assert_eq!(
            &plan(&lab, &inputs).node("cp1").expect("cp1").instance_id,
            id
        );

        inputs.keys = Some(fixtures::test_keys(&lab));
        let b = plan(&lab, &inputs);
        assert_ne!(&b.node("cp1").expect("cp1").instance_id, id);

        let mut lab2 = lab.clone();
        lab2.nodes[0].nics[1].ip = Ipv4Addr::new(10, 10, 1, 50);
        let c = plan(&lab2, &fixtures::inputs(&lab.name));
        assert_ne!(&c.node("cp1").expect("cp1").instance_id, id);
        // Other inputs (accel, paths) do not touch the seed.
        let mut other = fixtures::inputs(&lab.name);
        other.accel = Accel::Kvm;
        other.console_dir = "/elsewhere".into();
        assert_eq!(
            &plan(&lab, &other).node("cp1").expect("cp1").instance_id,
            id
        );
    }

    #[test]
    fn plan_is_total_on_degenerate_labs() {
        let mut lab = fixtures::ha_lab();
        for n in &mut lab.nodes {
            n.nics.clear();
            n.role = Role::Worker;
        }
        lab.images.clear();
        let p = plan(&lab, &fixtures::inputs(&lab.name));
        assert_eq!(
            p.node("cp1").expect("cp1").ssh_address,
            Ipv4Addr::UNSPECIFIED
        );
        assert_eq!(p.node("cp1").expect("cp1").overlay.backing, None);
        assert_eq!(p.kubernetes.as_ref().expect("k").init_node, "");
        assert!(!ids(&p).contains(&"kubeadm-init"));
    }
}
