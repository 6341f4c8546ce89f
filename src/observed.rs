//! What exists on the hypervisor now, as plain data (filled by a backend, read by the pure
//! reconciler).

use serde::Serialize;

/// The klab ownership tag as read back from an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OwnerTag {
    pub lab: String,
    /// Node name for domains; `None` for networks.
    pub node: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainState {
    Running,
    Paused,
    Shutoff,
    Crashed,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedDomain {
    pub name: String,
    pub owner: Option<OwnerTag>,
    pub state: DomainState,
    /// Paths of the disks the domain uses (to find its volumes in a shared pool).
    pub disks: Vec<String>,
    /// The domain's NICs on libvirt networks (running domains only).
    pub nics: Vec<ObservedNic>,
}

/// One NIC of a running domain as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedNic {
    /// libvirt network it belongs to.
    pub network: String,
    /// Whether its host-side device is a member of the network's bridge; `None` when the host
    /// cannot tell (remote URI, no device name).
    pub attached: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedNetwork {
    pub name: String,
    pub owner: Option<OwnerTag>,
    pub active: bool,
    pub bridge: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedPool {
    pub name: String,
    pub path: Option<String>,
    pub active: bool,
    /// Lab named by the pool's ownership tag volume, if any.
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedVolume {
    pub pool: String,
    pub name: String,
    pub path: String,
}

/// A snapshot of every libvirt object whose name or tag could belong to a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Observed {
    pub domains: Vec<ObservedDomain>,
    pub networks: Vec<ObservedNetwork>,
    pub pools: Vec<ObservedPool>,
    pub volumes: Vec<ObservedVolume>,
}

/// Name of the zero-byte volume that marks a storage pool as created by klab for `lab`
/// (libvirt pools carry no metadata).
pub fn pool_tag_volume(lab: &str) -> String {
    format!("klab-owner-{lab}.tag")
}
