//! Hypervisor backends. Blocking by design: the executor calls every method inside
//! `tokio::task::spawn_blocking`, so no backend ever blocks the async runtime.

use serde::Serialize;

pub mod fake;
pub mod hyperv;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod xml;

/// What the hypervisor offers, for `[host] accel = "auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AccelSupport {
    pub kvm: bool,
    pub qemu: bool,
}

pub use crate::observed::*;

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
    /// The backend (or this libvirt driver) cannot do this operation at all.
    #[error("{op} {kind} `{name}`: not supported by {backend}")]
    Unsupported {
        op: &'static str,
        kind: &'static str,
        name: String,
        backend: String,
    },
    /// A call that did not return within its bound (a wedged libvirtd).
    #[error(
        "{backend} did not answer `{what}` within {}; is libvirtd wedged? `virsh -c {uri} list` shows whether it answers (restart it with `systemctl restart libvirtd`)",
        seconds(.after)
    )]
    Unresponsive {
        backend: &'static str,
        what: String,
        after: std::time::Duration,
        uri: String,
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

/// `60s`, `0.3s`.
fn seconds(d: &std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
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
    /// Force a running domain off (keeps its definition and disks). No-op when it is not running.
    fn stop_domain(&self, name: &str) -> Result<()>;
    /// The state of one domain, `None` when it does not exist. Cheap: polled while waiting.
    fn domain_state(&self, name: &str) -> Result<Option<DomainState>>;
    /// Destroy (if running) and undefine with managed save, snapshot metadata and NVRAM.
    fn remove_domain(&self, name: &str) -> Result<()>;

    /// Pause a running domain (a lab's nodes are paused together before they are snapshotted).
    fn suspend_domain(&self, name: &str) -> Result<()> {
        Err(self.unsupported("suspend", name))
    }
    fn resume_domain(&self, name: &str) -> Result<()> {
        Err(self.unsupported("resume", name))
    }
    /// A snapshot of the domain with its memory, as `xml` (`<domainsnapshot>`) describes it.
    fn create_snapshot(&self, domain: &str, _xml: &str) -> Result<()> {
        Err(self.unsupported("snapshot", domain))
    }
    /// Back to snapshot `name`, left paused (the caller resumes the lab's nodes together).
    fn revert_snapshot(&self, domain: &str, _name: &str) -> Result<()> {
        Err(self.unsupported("revert", domain))
    }
    /// Absent is fine.
    fn delete_snapshot(&self, domain: &str, _name: &str) -> Result<()> {
        Err(self.unsupported("delete a snapshot of", domain))
    }
    fn list_snapshots(&self, domain: &str) -> Result<Vec<String>> {
        Err(self.unsupported("list snapshots of", domain))
    }

    fn unsupported(&self, op: &'static str, name: &str) -> BackendError {
        BackendError::Unsupported {
            op,
            kind: "domain",
            name: name.to_string(),
            backend: self.kind().to_string(),
        }
    }
}
