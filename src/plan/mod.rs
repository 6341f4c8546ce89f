//! PURE planning core: validated lab + explicit inputs → `LabPlan`. No I/O, no clock, no randomness.

#[doc(hidden)]
pub mod fixtures;
pub mod mac;
pub mod names;
pub mod steps;
pub mod types;

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
    let kubernetes = lab.kubernetes.as_ref().map(|k| plan_kubernetes(k, &nodes));
    let steps = kubernetes
        .as_ref()
        .map(steps::kubernetes_steps)
        .unwrap_or_default();

    // The instance-id covers everything the node's seed is rendered from, so it is computed last.
    for node in &mut nodes {
        node.instance_id = instance_id(node, &hosts, inputs.keys.as_ref());
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

fn plan_pool(lab: &Lab, inputs: &PlanInputs) -> PoolSpec {
    match &lab.host.pool {
        // A configured pool is the user's: its path is whatever libvirt says, so it stays unknown here.
        Some(name) => PoolSpec {
            name: name.clone(),
            path: String::new(),
            owned: false,
        },
        None => PoolSpec {
            name: names::pool_name(&lab.name),
            path: inputs.pool_dir.clone(),
            owned: true,
        },
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

    KubernetesSpec {
        version: k.version.clone(),
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
        calico_autodetect: format!("interface={CLUSTER_IFNAME}"),
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
    hosts: &'a [HostEntry],
    user_public_key: Option<&'a str>,
    host_public_key: Option<&'a str>,
}

fn instance_id(node: &NodeSpec, hosts: &[HostEntry], keys: Option<&KeyMaterial>) -> String {
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
        hosts,
        user_public_key: keys.map(|k| k.user_public_key.as_str()),
        host_public_key: host_key,
    };
    // Serializing plain data (strings, addresses, numbers) cannot fail; fall back to the Debug form anyway.
    let data = serde_json::to_vec(&inputs).unwrap_or_else(|_| format!("{:?}", node).into_bytes());
    let hash = names::sha256_hex(&data);
    format!("{}-{}", node.domain, &hash[..12])
}
