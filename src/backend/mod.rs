//! Hypervisor backends. Blocking by design: the executor calls every method inside
//! `tokio::task::spawn_blocking`, so no backend ever blocks the async runtime.

use serde::Serialize;

pub mod fake;
#[cfg(feature = "libvirt")]
pub mod libvirt;

/// What the hypervisor offers, for `[host] accel = "auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AccelSupport {
    pub kvm: bool,
    pub qemu: bool,
}

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

/// Name of the zero-byte volume that marks a storage pool as created by klab for `lab`.
pub fn pool_tag_volume(lab: &str) -> String {
    format!("klab-owner-{lab}.tag")
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("{op} {kind} `{name}`: {message}")]
    Op {
        op: &'static str,
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    pub fn op(op: &'static str, kind: &'static str, name: &str, message: impl ToString) -> Self {
        Self::Op {
            op,
            kind,
            name: name.to_string(),
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// The hypervisor seam. Every method is idempotent where the name says `ensure`, and every
/// destructive method acts on one named object (callers decide ownership before calling).
pub trait Backend: Send + Sync + 'static {
    /// Short name for messages (`libvirt`, `fake`, `hyperv`).
    fn kind(&self) -> &'static str;
    /// The URI or host description.
    fn uri(&self) -> String;
    fn accel_support(&self) -> Result<AccelSupport>;

    /// Every domain, network and pool whose name starts with `prefix` or carries a klab tag,
    /// plus the volumes of those pools.
    fn observe(&self, prefix: &str) -> Result<Observed>;

    /// Define (or redefine) and start a network from its XML. No-op when it is already active.
    fn ensure_network(&self, name: &str, xml: &str) -> Result<()>;
    fn remove_network(&self, name: &str) -> Result<()>;

    /// Define, build and start a dir pool from XML and create its tag volume for `lab`.
    fn ensure_pool(&self, name: &str, xml: &str, lab: &str) -> Result<()>;
    /// Destroy, delete (directory) and undefine a pool; all its volumes must be gone.
    fn remove_pool(&self, name: &str) -> Result<()>;

    /// Create a volume from XML (overlays carry their backing store in the XML).
    fn create_volume(&self, pool: &str, xml: &str) -> Result<()>;
    /// Create a raw volume of `data.len()` bytes and upload `data` into it.
    fn upload_volume(&self, pool: &str, name: &str, data: &[u8]) -> Result<()>;
    fn remove_volume(&self, pool: &str, name: &str) -> Result<()>;

    /// Define a domain from XML and start it.
    fn define_and_start(&self, name: &str, xml: &str) -> Result<()>;
    fn start_domain(&self, name: &str) -> Result<()>;
    /// Destroy (if running) and undefine with managed save, snapshot metadata and NVRAM.
    fn remove_domain(&self, name: &str) -> Result<()>;
}
