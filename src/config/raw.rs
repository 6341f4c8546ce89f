//! What the user wrote: the lab file as serde structs, every value with its byte span.
//!
//! Scalars are [`Field`]s: a wrong type does not stop deserialization, it is kept and reported by
//! validation next to every other error. Unknown keys are not rejected here (no
//! `deny_unknown_fields`); `keys.rs` finds them all. The JSON Schema (`klab schema`) is derived from
//! these types, and the unknown-key check walks that same schema.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer};

/// A value and the byte range it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sp<T> {
    pub span: Range<usize>,
    pub value: T,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Sp<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = toml::Spanned::<T>::deserialize(d)?;
        let span = s.span();
        Ok(Sp {
            span,
            value: s.into_inner(),
        })
    }
}

impl<T: JsonSchema> JsonSchema for Sp<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// A value of the expected type, or whatever the user wrote instead (reported by validation).
#[derive(Debug, Clone, PartialEq)]
pub enum Lenient<T> {
    Ok(T),
    Bad(toml::Value),
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = toml::Value::deserialize(d)?;
        Ok(match T::deserialize(raw.clone()) {
            Ok(v) => Lenient::Ok(v),
            Err(_) => Lenient::Bad(raw),
        })
    }
}

impl<T: JsonSchema> JsonSchema for Lenient<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// A spanned scalar that may have the wrong type.
pub type Field<T> = Sp<Lenient<T>>;

/// A klab lab file (`lab.toml`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields, title = "klab lab file")]
pub struct LabConfig {
    /// Lab name: lowercase letters, digits and `-`, at most 20 characters. Prefixes every object klab makes.
    #[schemars(required)]
    pub name: Option<Field<String>>,
    /// Where and how the lab runs.
    pub host: Option<Sp<HostConfig>>,
    /// Values every node gets unless it sets its own.
    pub defaults: Option<Sp<DefaultsConfig>>,
    /// Custom images by key (a key equal to a catalog name replaces that catalog entry).
    #[serde(default)]
    pub images: BTreeMap<String, Sp<ImageConfig>>,
    /// Networks by key.
    #[serde(default)]
    pub networks: BTreeMap<String, Sp<NetworkConfig>>,
    /// Nodes (VMs), in order. NIC 1 of each node carries its default route.
    #[serde(default)]
    pub nodes: Vec<Sp<NodeConfig>>,
    /// Kubernetes settings; absent = a plain VM lab.
    pub kubernetes: Option<Sp<KubernetesConfig>>,
    /// Bounds for every wait klab does.
    pub timeouts: Option<Sp<TimeoutsConfig>>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields)]
pub struct HostConfig {
    /// libvirt connection URI (default: `--connect`, `KLAB_CONNECT`, then `qemu:///system`).
    pub uri: Option<Field<String>>,
    /// Accelerator: `auto` uses KVM where libvirt offers it; `qemu` (TCG) works everywhere.
    pub accel: Option<Field<AccelName>>,
    /// Hypervisor: `libvirt` (default) or `hyperv` (Windows Hyper-V through PowerShell, also from WSL2).
    pub backend: Option<Field<BackendName>>,
    /// Where copies of this lab (`klab up --copy`) take their subnets from (default `10.240.0.0/12`;
    /// `KLAB_SUBNET_POOL` overrides).
    pub subnet_pool: Option<Field<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    Libvirt,
    Hyperv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccelName {
    Auto,
    Kvm,
    Qemu,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields)]
pub struct DefaultsConfig {
    /// Catalog image name (`debian-12`, `ubuntu-24.04`, `almalinux-9`) or a key of `[images]`.
    pub image: Option<Field<String>>,
    #[schemars(range(min = 1, max = 256))]
    pub cpus: Option<Field<u32>>,
    /// Memory with a unit: `MiB` or `GiB`, e.g. `"2GiB"`.
    pub memory: Option<Field<String>>,
    /// Disk size in whole GiB, e.g. `"20GiB"`.
    pub disk: Option<Field<String>>,
    /// Login user cloud-init creates (passwordless sudo, klab's SSH key).
    pub user: Option<Field<String>>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields)]
pub struct ImageConfig {
    /// Download URL (needs `sha256`).
    pub url: Option<Field<String>>,
    /// SHA-256 of the file at `url` (64 hex characters).
    pub sha256: Option<Field<String>>,
    /// Absolute path of a local qcow2 image (instead of `url`).
    pub path: Option<Field<String>>,
    /// Guest OS family (default `debian`).
    pub family: Option<Field<FamilyName>>,
    /// Absolute path of a kernel for direct kernel boot.
    pub kernel: Option<Field<String>>,
    /// Absolute path of an initrd (needs `kernel`).
    pub initrd: Option<Field<String>>,
    /// Kernel command line (needs `kernel`).
    pub cmdline: Option<Field<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FamilyName {
    Debian,
    Ubuntu,
    Alma,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields)]
pub struct NetworkConfig {
    /// `nat` (libvirt NAT), `bridge` (an existing host bridge) or `isolated` (no forwarding).
    #[schemars(required)]
    pub mode: Option<Field<ModeName>>,
    /// Network address, e.g. `10.10.1.0/24`.
    #[schemars(required)]
    pub cidr: Option<Field<String>>,
    /// Default gateway for nodes whose NIC 1 is here (nat/isolated: first host address by default;
    /// bridge: required).
    pub gateway: Option<Field<String>>,
    /// Existing host bridge (bridge mode only).
    pub bridge: Option<Field<String>>,
    /// Nameservers for nodes whose NIC 1 is here.
    pub dns: Option<Sp<Vec<Field<String>>>>,
    #[schemars(range(min = 576, max = 9000))]
    pub mtu: Option<Field<u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    Nat,
    Bridge,
    Isolated,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields)]
pub struct NodeConfig {
    /// Hostname (RFC 1123 label). With `count`, the base of `<name>1` … `<name>N`.
    #[schemars(required)]
    pub name: Option<Field<String>>,
    /// `control-plane`, `worker` or `none` (a plain VM; the default).
    pub role: Option<Field<RoleName>>,
    /// Make this many nodes (`w` with count 3 → `w1`, `w2`, `w3`). A fixed NIC address is the first
    /// node's; the others get the following addresses.
    #[schemars(range(min = 1, max = 512))]
    pub count: Option<Field<i64>>,
    /// Catalog image name or a key of `[images]` (default: `[defaults]`, then `debian-12`).
    pub image: Option<Field<String>>,
    #[schemars(range(min = 1, max = 256))]
    pub cpus: Option<Field<u32>>,
    pub memory: Option<Field<String>>,
    pub disk: Option<Field<String>>,
    pub user: Option<Field<String>>,
    /// Network interfaces; NIC 1 carries the default route.
    pub nics: Option<Sp<Vec<Sp<NicConfig>>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RoleName {
    ControlPlane,
    Worker,
    None,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields)]
pub struct NicConfig {
    /// Key of `[networks]`.
    #[schemars(required)]
    pub network: Option<Field<String>>,
    /// Static address; absent = the next free address of the network (stable).
    pub ip: Option<Field<String>>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// `major.minor` or `major.minor.patch`, e.g. `"1.36"` or `"1.36.4"` (1.31 and newer).
    #[schemars(required)]
    pub version: Option<Field<String>>,
    /// Network that carries node IPs, the API server, etcd and Calico.
    #[schemars(required)]
    pub cluster_network: Option<Field<String>>,
    /// Default `10.244.0.0/16`.
    pub pod_cidr: Option<Field<String>>,
    /// Default `10.96.0.0/12`.
    pub service_cidr: Option<Field<String>>,
    /// Only `calico`.
    pub cni: Option<Field<CniName>>,
    /// API server address shared by the control planes (required with more than one).
    pub control_plane_vip: Option<Field<String>>,
    /// Calico release klab knows: `"3.32.1"` (default) or `"3.31.7"`.
    pub calico_version: Option<Field<String>>,
    /// Calico pool encapsulation: `vxlan` (default), `ipip` or `none`.
    pub encapsulation: Option<Field<EncapsulationName>>,
    /// Local Calico manifest (`calico.yaml`) instead of the pinned download, for airgapped labs.
    pub calico_manifest: Option<Field<String>>,
    /// Mirror of `https://pkgs.k8s.io/core:/stable:` (klab appends `/v1.NN/deb/` or `/v1.NN/rpm/`).
    pub package_repo: Option<Field<String>>,
    /// URL of the mirror's signing key (default: the repository's own key file).
    pub package_key: Option<Field<String>>,
    /// kubeadm `imageRepository`: a registry mirror of registry.k8s.io, e.g. `"registry.lab:5000/k8s"`.
    pub image_repository: Option<Field<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncapsulationName {
    Vxlan,
    Ipip,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CniName {
    Calico,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Until SSH answers with the pinned host key.
    pub ssh: Option<Field<DurationConfig>>,
    /// `cloud-init status --wait`.
    pub cloud_init: Option<Field<DurationConfig>>,
    /// One provisioning command.
    pub command: Option<Field<DurationConfig>>,
    /// Until every Kubernetes node is Ready.
    pub nodes_ready: Option<Field<DurationConfig>>,
}

/// `"90s"`, `"5m"`, `"1h"`, `"1m30s"`, or an integer number of seconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum DurationConfig {
    Seconds(u64),
    Text(String),
}
