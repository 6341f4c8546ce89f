//! The plan as data: everything klab will create for a lab, with every name, MAC and address fixed.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::model::{Accel, NetworkMode, OsFamily, Role};

/// XML namespace of klab's ownership metadata on libvirt objects.
pub const OWNER_NS: &str = "https://klab.dev/ns/lab/1";
/// Prefix libvirt uses for the metadata element (`<klab:lab …/>`).
pub const OWNER_PREFIX: &str = "klab";

/// Everything non-deterministic the planner needs, passed in explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInputs {
    /// The accelerator already resolved against the hypervisor (`Auto` is kept as `Auto` when
    /// planning offline; the domain template then renders `qemu`, the one that works everywhere).
    pub accel: Accel,
    /// libvirt URI the plan targets (informational; recorded in state).
    pub uri: String,
    /// Directory of the per-lab storage pool (when klab creates the pool).
    pub pool_dir: String,
    /// Where cached base images live: `<image_cache>/<image key>.qcow2` unless a path image.
    pub image_cache: String,
    /// Where serial console logs go: `<console_dir>/<domain>.log`.
    pub console_dir: String,
    /// Key material; `None` renders placeholders (plan/render without state).
    pub keys: Option<KeyMaterial>,
    /// Catalog images that `klab image build` made locally (read from the cache by the caller): they
    /// are used instead of a download and boot their own kernel directly.
    pub local_images: Vec<LocalImage>,
}

/// A locally built image in the cache, as found by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// Catalog name it stands in for, e.g. `debian-12`.
    pub key: String,
    pub path: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

/// Generated keys, owned by the state directory. Never printed or logged.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial {
    /// `ssh-ed25519 AAAA… klab@<lab>`: authorized for the lab user on every node.
    pub user_public_key: String,
    /// Per node, in node order: the pre-generated ed25519 host key.
    pub host_keys: Vec<(String, HostKey)>,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("user_public_key", &self.user_public_key)
            .field("host_keys", &self.host_keys.len())
            .finish()
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    /// OpenSSH PEM (`-----BEGIN OPENSSH PRIVATE KEY-----`), LF line endings.
    pub private_openssh: String,
    /// `ssh-ed25519 AAAA…` (no comment).
    pub public_openssh: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public_openssh", &self.public_openssh)
            .field("private_openssh", &"<redacted>")
            .finish()
    }
}

/// The whole plan for one lab. Serializes to the `klab plan --output json` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPlan {
    pub lab: String,
    /// `klab-<lab>`: every object name starts with it.
    pub prefix: String,
    pub uri: String,
    pub accel: Accel,
    pub owner: Ownership,
    pub pool: PoolSpec,
    pub networks: Vec<NetworkSpec>,
    pub images: Vec<ImageSpec>,
    pub nodes: Vec<NodeSpec>,
    /// `/etc/hosts` entries every node gets (cluster-network address of every node, VIP).
    pub hosts: Vec<HostEntry>,
    pub kubernetes: Option<KubernetesSpec>,
    /// Provisioning steps in execution order (empty for a plain VM lab).
    pub steps: Vec<ProvisionStep>,
}

impl LabPlan {
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
    pub fn network(&self, key: &str) -> Option<&NetworkSpec> {
        self.networks.iter().find(|n| n.key == key)
    }
}

/// The ownership tag written into every libvirt object klab creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    pub namespace: String,
    pub lab: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    /// libvirt pool name: `klab-<lab>`, created and removed by klab.
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Key in the lab file.
    pub key: String,
    /// libvirt network name: `klab-<lab>-<key>`.
    pub name: String,
    pub mode: NetworkMode,
    /// Linux bridge: derived (≤ 15 chars, stable) for nat/isolated; the host bridge for bridge mode.
    pub bridge: String,
    /// Network address and prefix, e.g. `10.10.1.0` / 24.
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub netmask: Ipv4Addr,
    /// Address klab puts on the bridge (nat and isolated): the gateway. `None` for bridge mode.
    pub host_ip: Option<Ipv4Addr>,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: Option<u32>,
    /// Stable per-network byte used in MACs (useful in diagnostics).
    pub mac_seed: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub key: String,
    pub family: OsFamily,
    /// Where the base image is (cache file for URL images, the path otherwise).
    pub base_path: String,
    /// Download source for URL images.
    pub url: Option<String>,
    pub sha256: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub role: Role,
    /// libvirt domain name: `klab-<lab>-<node>`.
    pub domain: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub image: String,
    pub user: String,
    pub overlay: VolumeSpec,
    pub seed: VolumeSpec,
    pub nics: Vec<NicSpec>,
    /// Address klab uses for SSH (NIC 1's address).
    pub ssh_address: Ipv4Addr,
    /// Address on the cluster network (node-ip); NIC 1's address in a plain VM lab.
    pub cluster_ip: Ipv4Addr,
    pub console_log: String,
    /// cloud-init instance-id: changes when the seed content changes.
    pub instance_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Volume name in the pool.
    pub name: String,
    /// Absolute path it will have (pool dir + name).
    pub path: String,
    pub format: VolumeFormat,
    pub capacity_bytes: u64,
    /// Backing file for copy-on-write overlays.
    pub backing: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    Qcow2,
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Network key in the lab file.
    pub network: String,
    /// libvirt network name.
    pub libvirt_network: String,
    /// Name the guest gives the interface (cloud-init `set-name`), e.g. `ext0`, `lab0`.
    pub ifname: String,
    /// `52:54:00:xx:xx:xx`, from a stable hash of lab/node/NIC index.
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// Only on NIC 1: the default route.
    pub gateway: Option<Ipv4Addr>,
    /// Only on NIC 1.
    pub dns: Vec<Ipv4Addr>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    pub ip: Ipv4Addr,
    pub names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesSpec {
    /// Full version when given, else `major.minor` (the newest patch of that minor is installed).
    pub version: String,
    /// `v1.NN` for the package repository path.
    pub minor: String,
    pub cluster_network: String,
    /// Interface name of the cluster NIC inside every node (same on all nodes).
    pub cluster_ifname: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    /// `VIP:6443` with HA, else the first control plane's cluster IP `:6443`.
    pub control_plane_endpoint: String,
    pub control_plane_vip: Option<Ipv4Addr>,
    /// First control plane: runs `kubeadm init`.
    pub init_node: String,
    pub control_planes: Vec<String>,
    pub workers: Vec<String>,
    /// API server certificate SANs beyond kubeadm's defaults.
    pub cert_sans: Vec<String>,
    pub calico_version: String,
    /// `interface=<cluster_ifname>`: Calico's autodetection pinned to the isolated NIC.
    pub calico_autodetect: String,
}

/// One provisioning step, as data. The provisioner turns it into commands on nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionStep {
    /// Stable id, e.g. `preflight`, `containerd`, `packages`, `kubeadm-init`, `join-control-plane`.
    pub id: String,
    /// Nodes it runs on, in order.
    pub nodes: Vec<String>,
    /// `true`: one node at a time (joins); `false`: all nodes in parallel.
    pub serial: bool,
    pub description: String,
}
