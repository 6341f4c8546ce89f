//! Use cases: `up`, `down` and `status` as library calls. Each takes an [`Env`]: how to reach a
//! hypervisor (an injected [`Connector`]) and a node ([`Dialer`]), where state lives ([`Paths`]),
//! where base images come from ([`Images`]) and where progress goes (the [`Printer`]). The CLI's
//! `commands/` only turn arguments into a request and the outcome into output; tests drive the
//! same functions with the fake backend and a fake dialer.

pub mod down;
pub mod host;
pub mod hyperv;
pub mod provision;
pub mod snapshot;
pub mod status;
pub mod up;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{AccelSupport, Backend, BackendError};
use crate::config::Diagnostics;
use crate::exec::{Dialer, SshDialer};
use crate::model::Accel;
use crate::output::Printer;
use crate::plan::{ImageSpec, LocalImage};
use crate::reconcile::Refusal;

pub use crate::exec::crash_point;

/// The libvirt URI when neither `--connect`, `KLAB_CONNECT`, `[host] uri` nor the lab's state
/// names one.
pub const DEFAULT_URI: &str = "qemu:///system";

/// Errors of the use cases and the CLI. `exit_code` maps them: 1 = the user can fix it, 2 = klab
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(Diagnostics),
    #[error("{message}")]
    User {
        message: String,
        hint: Option<String>,
    },
    #[error("refusing to change the lab:\n{}", .0.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n"))]
    Refused(Vec<Refusal>),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn user(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::User {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Internal(_) => 2,
            _ => 1,
        }
    }
    pub fn hint(&self) -> Option<&str> {
        match self {
            Self::User { hint, .. } => hint.as_deref(),
            _ => None,
        }
    }
}

/// Render an error with its whole source chain, once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}

impl From<crate::state::StateError> for Error {
    fn from(e: crate::state::StateError) -> Self {
        match e {
            crate::state::StateError::Locked { .. } => Error::user(
                e.to_string(),
                "wait for the other command to finish (or stop it); the lock is released when it exits",
            ),
            other => Error::Internal(chain(&other)),
        }
    }
}

/// Where klab keeps things: per-lab state and the data root (pools, console logs).
#[derive(Debug, Clone)]
pub struct Paths {
    pub state_root: PathBuf,
    pub data_root: PathBuf,
}

impl Paths {
    /// `KLAB_STATE_DIR` / `KLAB_DATA_DIR` or their defaults.
    pub fn from_env() -> Self {
        Self {
            state_root: crate::paths::state_root(),
            data_root: crate::paths::data_root(),
        }
    }
    pub fn pool_dir(&self, lab: &str) -> PathBuf {
        self.data_root.join("pools").join(lab)
    }
    pub fn console_dir(&self) -> PathBuf {
        self.data_root.join("console")
    }
    pub fn state(&self, lab: &str) -> crate::state::StateDir {
        crate::state::StateDir::new(&self.state_root, lab)
    }
}

/// Opens a hypervisor connection for a URI (blocking; called off the async runtime).
pub trait Connector: Send + Sync {
    fn connect(&self, uri: &str) -> Result<Arc<dyn Backend>, BackendError>;
}

impl<F> Connector for F
where
    F: Fn(&str) -> Result<Arc<dyn Backend>, BackendError> + Send + Sync,
{
    fn connect(&self, uri: &str) -> Result<Arc<dyn Backend>, BackendError> {
        self(uri)
    }
}

/// libvirt through the `virt` crate.
pub struct LibvirtConnector;

impl Connector for LibvirtConnector {
    fn connect(&self, uri: &str) -> Result<Arc<dyn Backend>, BackendError> {
        #[cfg(feature = "libvirt")]
        {
            Ok(Arc::new(crate::backend::libvirt::LibvirtBackend::connect(
                uri,
            )?))
        }
        #[cfg(not(feature = "libvirt"))]
        {
            Err(BackendError::Connect {
                uri: uri.to_string(),
                message: "this klab was built without the libvirt backend (build with the default features; needs libvirt-dev)".into(),
            })
        }
    }
}

/// Base images: what is built locally, and fetching/checking what a plan needs.
pub trait Images: Send + Sync {
    fn local_images(&self) -> Result<Vec<LocalImage>, String>;
    fn cache_root(&self) -> PathBuf;
    /// Make `spec`'s base image usable (download and verify, or check a path image). Blocking.
    fn ensure(&self, spec: &ImageSpec, quiet: bool) -> Result<(), String>;
}

/// The on-disk image cache.
pub struct CacheImages(pub crate::image::ImageCache);

impl Images for CacheImages {
    fn local_images(&self) -> Result<Vec<LocalImage>, String> {
        self.0.local_images().map_err(|e| chain(&e))
    }
    fn cache_root(&self) -> PathBuf {
        self.0.root().to_path_buf()
    }
    fn ensure(&self, spec: &ImageSpec, quiet: bool) -> Result<(), String> {
        let r = if quiet {
            self.0.ensure(spec, &crate::image::NoProgress)
        } else {
            self.0.ensure(spec, &crate::image::BarProgress::new())
        };
        r.map(|_| ()).map_err(|e| chain(&e))
    }
}

/// Everything a use case reaches the world through.
#[derive(Clone)]
pub struct Env {
    pub connector: Arc<dyn Connector>,
    pub dialer: Arc<dyn Dialer>,
    pub images: Arc<dyn Images>,
    pub paths: Paths,
    pub printer: Printer,
    /// Bound for every hypervisor call (and for connecting).
    pub call_timeout: Duration,
    /// Host checks that only make sense on this machine (routes, bridges, libvirt's dnsmasq
    /// directory); tests with a fake backend turn them off.
    pub host_checks: bool,
}

impl Env {
    /// The real thing: libvirt, russh, the image cache and paths from the environment.
    pub fn system(printer: Printer) -> Self {
        Self {
            connector: Arc::new(LibvirtConnector),
            dialer: Arc::new(SshDialer),
            images: Arc::new(CacheImages(crate::image::ImageCache::new(
                crate::paths::image_cache(),
            ))),
            paths: Paths::from_env(),
            printer,
            call_timeout: call_timeout_from_env(),
            host_checks: true,
        }
    }

    /// Connect to `uri`, bounded like every other hypervisor call.
    pub async fn connect(&self, uri: &str) -> Result<Arc<dyn Backend>, Error> {
        let connector = Arc::clone(&self.connector);
        let u = uri.to_string();
        let task = tokio::task::spawn_blocking(move || connector.connect(&u));
        let hint = "is libvirtd running and may you use it? `klab doctor` checks; choose another URI with --connect or KLAB_CONNECT";
        match tokio::time::timeout(self.call_timeout, task).await {
            Ok(Ok(Ok(b))) => Ok(b),
            Ok(Ok(Err(e))) => Err(Error::user(chain(&e), hint)),
            Ok(Err(e)) => Err(Error::Internal(e.to_string())),
            Err(_) => Err(Error::user(
                format!(
                    "libvirt did not answer `connect {uri}` within {}s; is libvirtd wedged?",
                    self.call_timeout.as_secs()
                ),
                "`virsh -c URI list` shows whether it answers; restart it with `systemctl restart libvirtd`",
            )),
        }
    }

    /// One hypervisor call with this environment's bound, errors as internal.
    pub async fn call<T: Send + 'static>(
        &self,
        backend: &Arc<dyn Backend>,
        what: impl Into<String>,
        f: impl FnOnce(&dyn Backend) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, Error> {
        crate::exec::call_within(backend, what, self.call_timeout, f)
            .await
            .map_err(|e| Error::Internal(chain(&e)))
    }
}

/// `KLAB_LIBVIRT_TIMEOUT` (seconds, for very slow or loaded hosts), else [`crate::exec::CALL_TIMEOUT`].
fn call_timeout_from_env() -> Duration {
    std::env::var("KLAB_LIBVIRT_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| (1..=86_400).contains(s))
        .map(Duration::from_secs)
        .unwrap_or(crate::exec::CALL_TIMEOUT)
}

/// The timeouts of the lab file `up` read (its state's `meta.json` says where; a copy's is its
/// lab's file) while it is still there and valid; the defaults otherwise.
pub fn lab_timeouts(meta: Option<&crate::state::LabMeta>) -> crate::model::Timeouts {
    meta.and_then(|m| m.source.as_ref())
        .and_then(|f| crate::config::check_file(std::path::Path::new(f)).ok())
        .map(|c| c.lab.timeouts)
        .unwrap_or_default()
}

/// Runs blocking work (file locks that wait, connect timeouts) off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a blocking task failed: {e}")))?
}

/// Where the host's route to a node leaves, checked before SSH — for a hypervisor on this machine
/// only (a remote one's bridges are not here).
pub fn route_check(env: &Env, uri: &str, host: &host::HostFs) -> Option<crate::exec::RouteCheck> {
    if !(env.host_checks && uri.starts_with("qemu:///")) {
        return None;
    }
    let host = host.clone();
    Some(Arc::new(move |addr, bridge: &str| {
        host.route_goes_through(addr, bridge)
    }))
}

/// Resolve `auto`/`kvm`/`qemu` against what the hypervisor offers.
pub fn choose_accel(requested: Accel, support: AccelSupport) -> Result<Accel, Error> {
    match requested {
        Accel::Auto if support.kvm => Ok(Accel::Kvm),
        Accel::Auto | Accel::Qemu if support.qemu => Ok(Accel::Qemu),
        Accel::Kvm if support.kvm => Ok(Accel::Kvm),
        Accel::Kvm => Err(Error::user(
            "accelerator `kvm` was requested but libvirt offers no KVM domains on this host",
            "use `--accel qemu` (or `[host] accel = \"qemu\"`, KLAB_ACCEL=qemu) to run under TCG",
        )),
        _ => Err(Error::user(
            "libvirt offers neither KVM nor QEMU (TCG) x86_64 guests here",
            "install qemu-system-x86 and restart libvirtd; `klab doctor` checks",
        )),
    }
}

/// Whether a libvirt URI is a hypervisor on this machine (host checks apply).
pub fn is_local_system_uri(uri: &str) -> bool {
    uri == "qemu:///system"
}

/// An existing lab as found on this host: its state (if any) and what the hypervisor holds.
pub struct ExistingLab {
    pub uri: String,
    pub meta: Option<crate::state::LabMeta>,
    pub saved: Option<crate::plan::LabPlan>,
    /// Object names from `plan.json` of any klab version (also when `saved` cannot be read).
    pub facts: Option<crate::state::DownFacts>,
    /// Set when a state file could not be read: what was damaged, for a note.
    pub damaged: Vec<String>,
    pub backend: Arc<dyn Backend>,
    pub observed: crate::observed::Observed,
}

/// Connect to where `lab` was made and look at it. The URI the lab was made on (from its state)
/// wins over the default, so `klab down NAME` and `klab status NAME` work from anywhere. A damaged
/// state file never blocks: the lab is then found by its tags.
pub async fn find_lab(
    env: &Env,
    connect: Option<&str>,
    state: &crate::state::StateDir,
) -> Result<ExistingLab, Error> {
    let mut damaged = Vec::new();
    let meta = state.load_meta().unwrap_or_else(|e| {
        damaged.push(chain(&e));
        None
    });
    let saved = state.load_plan().unwrap_or_else(|e| {
        damaged.push(chain(&e));
        None
    });
    let facts = saved
        .as_ref()
        .map(crate::state::DownFacts::from)
        .or_else(|| state.load_down_facts());
    let uri = connect
        .map(str::to_string)
        .or_else(|| meta.as_ref().map(|m| m.uri.clone()))
        .unwrap_or_else(|| DEFAULT_URI.to_string());
    let backend = env.connect(&uri).await?;
    let prefix = format!("klab-{}", state.lab());
    let observed = env
        .call(&backend, format!("list objects {prefix}*"), move |b| {
            b.observe(&prefix)
        })
        .await?;
    Ok(ExistingLab {
        uri,
        meta,
        saved,
        facts,
        damaged,
        backend,
        observed,
    })
}
