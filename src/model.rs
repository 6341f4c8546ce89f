//! The validated lab: what `config::load` hands to the planner.
//!
//! Every value here is typed and checked (units parsed, CIDRs and IPs valid, names unique, automatic
//! addresses allocated), so the planner never fails on user input.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// A validated lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub host: Host,
    /// Images referenced by at least one node, by key (catalog name or `[images.<key>]`).
    pub images: BTreeMap<String, Image>,
    /// Networks sorted by name.
    pub networks: Vec<Network>,
    /// Nodes in file order, `count` already expanded (`w` with count 3 → `w1`, `w2`, `w3`).
    pub nodes: Vec<Node>,
    pub kubernetes: Option<Kubernetes>,
    pub timeouts: Timeouts,
}

impl Lab {
    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Where and how the lab runs (`[host]`). Environment and CLI overrides are applied by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Host {
    /// libvirt connection URI; `None` = caller's default (`--connect`, `KLAB_CONNECT`, `qemu:///system`).
    pub uri: Option<String>,
    pub accel: Accel,
    /// Which hypervisor drives the lab (`[host] backend`).
    #[serde(default)]
    pub backend: BackendKind,
    /// `[host] subnet-pool`: where copies of the lab take their subnets from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_pool: Option<Ipv4Network>,
}

/// `[host] backend`: the hypervisor klab drives.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Libvirt,
    Hyperv,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Libvirt => "libvirt",
            Self::Hyperv => "hyperv",
        }
    }
}

/// Accelerator choice: `auto` asks the hypervisor; `qemu` is TCG and works everywhere.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Qemu,
}

impl Accel {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "kvm" => Some(Self::Kvm),
            "qemu" | "tcg" => Some(Self::Qemu),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
        }
    }
}

/// Guest OS family: decides package manager, firewall and SELinux handling in provisioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OsFamily {
    #[default]
    Debian,
    Ubuntu,
    Alma,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub source: ImageSource,
    pub family: OsFamily,
    /// Direct kernel boot (all three optional; `cmdline` only with `kernel`).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageSource {
    /// Downloaded into the cache and verified.
    Url { url: String, sha256: String },
    /// A local file used as the backing file.
    Path { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    Nat,
    Bridge,
    Isolated,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Bridge => "bridge",
            Self::Isolated => "isolated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Key of `[networks.<name>]`.
    pub name: String,
    pub mode: NetworkMode,
    /// Network address form (`10.10.1.0/24`).
    pub cidr: Ipv4Network,
    /// Gateway for nodes whose NIC 1 is on this network. nat/isolated: first host address unless
    /// set; bridge: required for static IPs.
    pub gateway: Ipv4Addr,
    /// Existing host bridge (bridge mode only).
    pub bridge: Option<String>,
    /// Nameservers handed to nodes whose NIC 1 is on this network (empty = the gateway for nat).
    pub dns: Vec<Ipv4Addr>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ControlPlane,
    Worker,
    None,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ControlPlane => "control-plane",
            Self::Worker => "worker",
            Self::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Hostname and node name (count-expanded).
    pub name: String,
    pub role: Role,
    /// Key into `Lab::images`.
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    /// Login user cloud-init creates.
    pub user: String,
    /// NIC 1 first: it carries the default route.
    pub nics: Vec<Nic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub network: String,
    /// Static address (explicit or allocated by `plan::ipam`).
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cni {
    Calico,
}

/// Calico's IPv4 pool encapsulation (`[kubernetes] encapsulation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Encapsulation {
    /// VXLAN between nodes (no BGP needed for reachability).
    #[default]
    Vxlan,
    /// IP-in-IP.
    Ipip,
    /// Plain routing (BGP mesh on one L2 network).
    None,
}

impl Encapsulation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::Ipip => "ipip",
            Self::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kubernetes {
    /// `major.minor` or `major.minor.patch`, e.g. `1.36` or `1.36.4`.
    pub version: String,
    pub cluster_network: String,
    pub pod_cidr: Ipv4Network,
    pub service_cidr: Ipv4Network,
    pub cni: Cni,
    pub control_plane_vip: Option<Ipv4Addr>,
    /// Calico release to install (pinned).
    pub calico_version: String,
    /// Calico IPv4 pool encapsulation.
    pub encapsulation: Encapsulation,
    /// Base URL of a pkgs.k8s.io mirror (replaces `https://pkgs.k8s.io/core:/stable:`).
    pub package_repo: Option<String>,
    /// URL of the repository signing key (default: the repository's `Release.key`).
    pub package_key: Option<String>,
    /// kubeadm `imageRepository` (a registry mirror of registry.k8s.io).
    pub image_repository: Option<String>,
    /// Local Calico manifest used instead of the catalog download (as written in the lab file).
    pub calico_manifest: Option<PathBuf>,
}

/// Every wait klab does has a bound; defaults suit TCG guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// From domain start until SSH answers with the pinned host key.
    pub ssh: Duration,
    /// `cloud-init status --wait`.
    pub cloud_init: Duration,
    /// One provisioning command.
    pub command: Duration,
    /// Until every Kubernetes node is Ready.
    pub nodes_ready: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            ssh: Duration::from_secs(300),
            cloud_init: Duration::from_secs(600),
            command: Duration::from_secs(900),
            nodes_ready: Duration::from_secs(900),
        }
    }
}

/// Defaults that apply when neither `[defaults]` nor the node sets a value.
pub mod defaults {
    pub const IMAGE: &str = "debian-12";
    pub const CPUS: u32 = 2;
    pub const MEMORY_MIB: u64 = 2048;
    pub const DISK_GIB: u64 = 20;
    pub const USER: &str = "klab";
    pub const POD_CIDR: &str = "10.244.0.0/16";
    pub const SERVICE_CIDR: &str = "10.96.0.0/12";
    /// Kubernetes minor new labs get (`klab init`, examples).
    pub const KUBERNETES_VERSION: &str = "1.36";
    pub const CALICO_VERSION: &str = "3.32.1";
    /// Where kubeadm, kubelet and kubectl come from; `/v1.NN/{deb,rpm}/` is appended.
    pub const PACKAGE_REPO: &str = "https://pkgs.k8s.io/core:/stable:";
}
