//! Hand-built validated labs for tests and benchmarks (no lab file needed). Not part of the CLI.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnetwork::Ipv4Network;

use crate::model::{
    Cni, Host, Image, ImageSource, Kubernetes, Lab, Network, NetworkMode, Nic, Node, OsFamily,
    Role, Timeouts, defaults,
};

use super::types::{HostKey, KeyMaterial, PlanInputs};

fn net(name: &str, mode: NetworkMode, cidr: &str, bridge: Option<&str>) -> Network {
    let cidr: Ipv4Network = cidr
        .parse()
        .unwrap_or_else(|_| Ipv4Network::from(Ipv4Addr::LOCALHOST));
    let gateway = cidr.nth(1).unwrap_or(cidr.network());
    Network {
        name: name.to_string(),
        mode,
        cidr,
        gateway,
        bridge: bridge.map(str::to_string),
        dns: Vec::new(),
        mtu: None,
    }
}

fn node(name: &str, role: Role, image: &str, nics: &[(&str, [u8; 4])]) -> Node {
    Node {
        name: name.to_string(),
        role,
        image: image.to_string(),
        cpus: defaults::CPUS,
        memory_mib: defaults::MEMORY_MIB,
        disk_gib: defaults::DISK_GIB,
        user: defaults::USER.to_string(),
        nics: nics
            .iter()
            .map(|(n, ip)| Nic {
                network: n.to_string(),
                ip: Ipv4Addr::from(*ip),
            })
            .collect(),
    }
}

fn debian_url_image() -> Image {
    Image {
        name: "debian-12".into(),
        source: ImageSource::Url {
            url: "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
                .into(),
            sha256: "0".repeat(64),
        },
        family: OsFamily::Debian,
        kernel: None,
        initrd: None,
        cmdline: None,
    }
}

fn kubernetes(vip: Option<[u8; 4]>) -> Kubernetes {
    Kubernetes {
        version: "1.32".into(),
        cluster_network: "cluster".into(),
        pod_cidr: defaults::POD_CIDR
            .parse()
            .unwrap_or_else(|_| Ipv4Network::from(Ipv4Addr::UNSPECIFIED)),
        service_cidr: defaults::SERVICE_CIDR
            .parse()
            .unwrap_or_else(|_| Ipv4Network::from(Ipv4Addr::UNSPECIFIED)),
        cni: Cni::Calico,
        control_plane_vip: vip.map(Ipv4Addr::from),
        calico_version: defaults::CALICO_VERSION.into(),
    }
}

/// HA Kubernetes lab: NAT + isolated cluster network + host bridge, 3 control planes behind a VIP,
/// 2 workers (one with a third NIC on the bridge), direct-kernel-boot image for the workers.
pub fn ha_lab() -> Lab {
    let mut outside = net("outside", NetworkMode::Nat, "192.168.150.0/24", None);
    outside.mtu = Some(1500);
    let mut lan = net("lan", NetworkMode::Bridge, "192.168.182.0/24", Some("br0"));
    lan.dns = vec![Ipv4Addr::new(1, 1, 1, 1)];
    let mut cluster = net("cluster", NetworkMode::Isolated, "10.10.1.0/24", None);
    cluster.mtu = Some(1450);
    let mut images = BTreeMap::new();
    images.insert("debian-12".to_string(), debian_url_image());
    images.insert(
        "custom".to_string(),
        Image {
            name: "custom".into(),
            source: ImageSource::Path {
                path: PathBuf::from("/var/lib/klab/images/custom.qcow2"),
            },
            family: OsFamily::Alma,
            kernel: Some(PathBuf::from("/var/lib/klab/images/custom.vmlinuz")),
            initrd: Some(PathBuf::from("/var/lib/klab/images/custom.initrd")),
            cmdline: Some("root=/dev/vda rw console=ttyS0".into()),
        },
    );
    let mut cp1 = node(
        "cp1",
        Role::ControlPlane,
        "debian-12",
        &[
            ("outside", [192, 168, 150, 10]),
            ("cluster", [10, 10, 1, 10]),
        ],
    );
    cp1.memory_mib = 4096;
    Lab {
        name: "demo".into(),
        host: Host::default(),
        images,
        networks: vec![cluster, lan, outside],
        nodes: vec![
            cp1,
            node(
                "cp2",
                Role::ControlPlane,
                "debian-12",
                &[
                    ("outside", [192, 168, 150, 11]),
                    ("cluster", [10, 10, 1, 11]),
                ],
            ),
            node(
                "cp3",
                Role::ControlPlane,
                "debian-12",
                &[
                    ("outside", [192, 168, 150, 12]),
                    ("cluster", [10, 10, 1, 12]),
                ],
            ),
            node(
                "w1",
                Role::Worker,
                "custom",
                &[
                    ("outside", [192, 168, 150, 20]),
                    ("cluster", [10, 10, 1, 20]),
                    ("lan", [192, 168, 182, 20]),
                ],
            ),
            node(
                "w2",
                Role::Worker,
                "custom",
                &[
                    ("outside", [192, 168, 150, 21]),
                    ("cluster", [10, 10, 1, 21]),
                ],
            ),
        ],
        kubernetes: Some(kubernetes(Some([10, 10, 1, 100]))),
        timeouts: Timeouts::default(),
    }
}

/// Plain VM lab (no Kubernetes), bridge NIC first.
pub fn plain_lab() -> Lab {
    let mut lan = net("lan", NetworkMode::Bridge, "192.168.182.0/24", Some("br0"));
    lan.dns = vec![Ipv4Addr::new(192, 168, 182, 1), Ipv4Addr::new(9, 9, 9, 9)];
    let mut images = BTreeMap::new();
    images.insert("debian-12".to_string(), debian_url_image());
    Lab {
        name: "plain".into(),
        host: Host::default(),
        images,
        networks: vec![
            net("back", NetworkMode::Isolated, "10.20.0.0/24", None),
            lan,
        ],
        nodes: vec![
            node(
                "vm1",
                Role::None,
                "debian-12",
                &[("lan", [192, 168, 182, 30]), ("back", [10, 20, 0, 30])],
            ),
            node(
                "vm2",
                Role::None,
                "debian-12",
                &[("lan", [192, 168, 182, 31])],
            ),
        ],
        kubernetes: None,
        timeouts: Timeouts::default(),
    }
}

/// A Kubernetes lab with one control plane and `nodes - 1` workers on a /16 cluster network,
/// for benchmarks.
pub fn generated_lab(nodes: usize) -> Lab {
    let mut images = BTreeMap::new();
    images.insert("debian-12".to_string(), debian_url_image());
    let node_list = (0..nodes)
        .map(|i| {
            let (name, role) = if i == 0 {
                ("cp1".to_string(), Role::ControlPlane)
            } else {
                (format!("w{i}"), Role::Worker)
            };
            let hi = u8::try_from((i + 10) / 250).unwrap_or(u8::MAX);
            let lo = u8::try_from((i + 10) % 250).unwrap_or(0);
            node(
                &name,
                role,
                "debian-12",
                &[
                    ("outside", [172, 16, hi, lo]),
                    ("cluster", [10, 10, hi, lo]),
                ],
            )
        })
        .collect();
    Lab {
        name: "big".into(),
        host: Host::default(),
        images,
        networks: vec![
            net("cluster", NetworkMode::Isolated, "10.10.0.0/16", None),
            net("outside", NetworkMode::Nat, "172.16.0.0/16", None),
        ],
        nodes: node_list,
        kubernetes: Some(kubernetes(None)),
        timeouts: Timeouts::default(),
    }
}

/// Default-looking plan inputs (no keys, no local images).
pub fn inputs(lab: &str) -> PlanInputs {
    PlanInputs {
        accel: crate::model::Accel::Auto,
        uri: "qemu:///system".into(),
        pool_dir: format!("/var/lib/klab/pools/{lab}"),
        image_cache: "/var/lib/klab/images".into(),
        console_dir: "/var/lib/klab/console".into(),
        keys: None,
        local_images: Vec::new(),
    }
}

/// Fixed, obviously fake key material (cloud-init's schema does not check key contents).
pub fn test_keys(lab: &Lab) -> KeyMaterial {
    KeyMaterial {
        user_public_key: format!(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeTestUserKeyForKlabSnapshotsOnly000 klab@{}",
            lab.name
        ),
        host_keys: lab
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    HostKey {
                        private_openssh: format!(
                            "-----BEGIN OPENSSH PRIVATE KEY-----\nFAKE-TEST-HOST-KEY-{}\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
                            n.name
                        ),
                        public_openssh: format!(
                            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeTestHostKey{}",
                            n.name
                        ),
                    },
                )
            })
            .collect(),
    }
}
