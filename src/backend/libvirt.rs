//! libvirt backend through the `virt` crate (no `virsh`). Every call blocks on a libvirt RPC; the
//! executor runs them inside `spawn_blocking`. One `Connect` lives as long as the backend.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Once};

use tracing::{debug, info, warn};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::network::Network;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::xml::{self, DiskSource};
use super::{
    AccelSupport, Backend, BackendError, DomainState, Observed, ObservedDomain, ObservedNetwork,
    ObservedNic, ObservedPool, ObservedVolume, Result, pool_tag_volume,
};
use crate::plan::OWNER_NS;

/// Bytes handed to one `virStreamSend`.
const UPLOAD_CHUNK: usize = 256 * 1024;

static CLEAR_ERROR_CALLBACK: Once = Once::new();

/// Owns the connection. `virt`'s `Drop for Connect` panics when `virConnectClose` fails; a
/// failed close at the end of a run must not turn into a crash, so the drop is contained.
struct Conn(Option<Connect>);

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            if std::thread::panicking() {
                // A second panic while unwinding would abort the process.
                std::mem::forget(conn);
            } else if catch_unwind(AssertUnwindSafe(move || drop(conn))).is_err() {
                warn!("closing the libvirt connection failed");
            }
        }
    }
}

/// The libvirt backend. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct LibvirtBackend {
    conn: Arc<Conn>,
    uri: String,
}

impl std::fmt::Debug for LibvirtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtBackend")
            .field("uri", &self.uri)
            .finish()
    }
}

fn code_is(err: &VirtError, code: ErrorNumber) -> bool {
    err.code() == Enum::Known(code)
}

fn unsupported(err: &VirtError) -> bool {
    code_is(err, ErrorNumber::NoSupport)
        || code_is(err, ErrorNumber::OperationUnsupported)
        || code_is(err, ErrorNumber::InvalidArg)
}

fn fail(op: &'static str, kind: &'static str, name: &str, err: VirtError) -> BackendError {
    BackendError::op(op, kind, name, err.message())
}

/// `qemu:///system`, `qemu+unix:///system`: libvirtd runs on this host, so pool paths and the
/// domains' tap devices (in /sys) are this host's.
fn is_local_uri(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(scheme, rest)| {
        rest.starts_with('/') && (!scheme.contains('+') || scheme.ends_with("+unix"))
    })
}

/// Whether host device `dev` (a domain's tap) is enslaved to `bridge`, from /sys/class/net.
fn bridge_member(dev: &str, bridge: &str) -> bool {
    std::fs::read_link(format!("/sys/class/net/{dev}/master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n == bridge))
        .unwrap_or(false)
}

fn map_state(state: Enum<virt::domain::DomainState, sys::virDomainState>) -> DomainState {
    use virt::domain::DomainState as S;
    match state {
        Enum::Known(S::Running | S::Blocked) => DomainState::Running,
        Enum::Known(S::Paused | S::PMSuspended) => DomainState::Paused,
        Enum::Known(S::Shutoff) => DomainState::Shutoff,
        Enum::Known(S::Crashed) => DomainState::Crashed,
        _ => DomainState::Other,
    }
}

impl LibvirtBackend {
    /// Open `uri` read-write.
    pub fn connect(uri: &str) -> Result<Self> {
        // Without this libvirt prints every error (including expected "not found") to stderr.
        CLEAR_ERROR_CALLBACK.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(uri)).map_err(|e| BackendError::Connect {
            uri: uri.to_string(),
            message: e.message().to_string(),
        })?;
        debug!(uri, "connected to libvirt");
        Ok(Self {
            conn: Arc::new(Conn(Some(conn))),
            uri: uri.to_string(),
        })
    }

    /// The underlying connection, for libvirt APIs the [`Backend`] trait does not cover
    /// (consoles, interface addresses) and for tests that need to poke the same driver instance.
    pub fn virt_connect(&self) -> Result<&Connect> {
        self.conn()
    }

    fn conn(&self) -> Result<&Connect> {
        self.conn.0.as_ref().ok_or_else(|| {
            BackendError::Other(format!("libvirt connection to {} is closed", self.uri))
        })
    }

    fn lookup_domain(&self, name: &str) -> Result<Option<Domain>> {
        match self.conn()?.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(fail("look up", "domain", name, e)),
        }
    }

    fn lookup_network(&self, name: &str) -> Result<Option<Network>> {
        match self.conn()?.lookup_network_by_name(name) {
            Ok(n) => Ok(Some(n)),
            Err(e) if code_is(&e, ErrorNumber::NoNetwork) => Ok(None),
            Err(e) => Err(fail("look up", "network", name, e)),
        }
    }

    fn lookup_pool(&self, name: &str) -> Result<Option<StoragePool>> {
        match self.conn()?.lookup_storage_pool_by_name(name) {
            Ok(p) => Ok(Some(p)),
            Err(e) if code_is(&e, ErrorNumber::NoStoragePool) => Ok(None),
            Err(e) => Err(fail("look up", "pool", name, e)),
        }
    }

    fn existing_pool(&self, op: &'static str, pool: &str, volume: &str) -> Result<StoragePool> {
        self.lookup_pool(pool)?.ok_or_else(|| {
            BackendError::op(
                op,
                "volume",
                volume,
                format!("pool `{pool}` does not exist"),
            )
        })
    }

    fn lookup_volume(
        pool: &StoragePool,
        pool_name: &str,
        name: &str,
    ) -> Result<Option<StorageVol>> {
        match pool.lookup_storage_vol_by_name(name) {
            Ok(v) => Ok(Some(v)),
            Err(e) if code_is(&e, ErrorNumber::NoStorageVolume) => Ok(None),
            Err(e) => Err(BackendError::op(
                "look up",
                "volume",
                name,
                format!("in pool `{pool_name}`: {}", e.message()),
            )),
        }
    }

    /// Names and paths of a pool's volumes; inactive pools have none we can see.
    fn pool_volumes(pool: &StoragePool, pool_name: &str) -> Result<Vec<(String, String)>> {
        if !pool.is_active().unwrap_or(false) {
            return Ok(Vec::new());
        }
        // Files removed behind libvirt's back only disappear from its view after a refresh.
        if let Err(e) = pool.refresh(0) {
            debug!(pool = pool_name, error = e.message(), "pool refresh failed");
        }
        let vols = pool
            .list_all_volumes(0)
            .map_err(|e| fail("list volumes of", "pool", pool_name, e))?;
        let mut out = Vec::with_capacity(vols.len());
        for vol in vols {
            let Ok(name) = vol.name() else { continue };
            let path = vol.path().unwrap_or_default();
            out.push((name, path));
        }
        out.sort();
        Ok(out)
    }

    fn observe_domain(&self, dom: &Domain, prefix: &str) -> Result<Option<ObservedDomain>> {
        let Ok(name) = dom.name() else {
            return Ok(None);
        };
        let desc = match dom.xml_desc(0) {
            Ok(d) => d,
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => return Ok(None),
            Err(e) => return Err(fail("read", "domain", &name, e)),
        };
        let owner = match dom.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(OWNER_NS), 0) {
            Ok(element) => xml::owner_tag_from_metadata_element(&element),
            Err(e) if code_is(&e, ErrorNumber::NoDomainMetadata) => None,
            // Drivers without the metadata API still show it in the XML.
            Err(_) => xml::owner_tag_in_object(&desc),
        };
        if !name.starts_with(prefix) && owner.is_none() {
            return Ok(None);
        }
        let state = match dom.state() {
            Ok((state, _)) => map_state(state),
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => return Ok(None),
            Err(e) => return Err(fail("read state of", "domain", &name, e)),
        };
        let disks = xml::domain_disk_sources(&desc)
            .into_iter()
            .map(|source| match source {
                DiskSource::File(path) => path,
                DiskSource::Volume { pool, volume } => self
                    .volume_path(&pool, &volume)
                    .unwrap_or_else(|| format!("{pool}/{volume}")),
            })
            .collect();
        let nics = if state == DomainState::Running {
            let local = is_local_uri(&self.uri);
            xml::domain_interfaces(&desc)
                .into_iter()
                .map(|(network, bridge, dev)| ObservedNic {
                    attached: match (local, bridge, dev) {
                        (true, Some(bridge), Some(dev)) => Some(bridge_member(&dev, &bridge)),
                        _ => None,
                    },
                    network,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Some(ObservedDomain {
            name,
            owner,
            state,
            disks,
            nics,
        }))
    }

    fn volume_path(&self, pool: &str, volume: &str) -> Option<String> {
        let pool = self.conn().ok()?.lookup_storage_pool_by_name(pool).ok()?;
        pool.lookup_storage_vol_by_name(volume).ok()?.path().ok()
    }

    fn observe_network(net: &Network, prefix: &str) -> Result<Option<ObservedNetwork>> {
        let Ok(name) = net.name() else {
            return Ok(None);
        };
        let desc = match net.xml_desc(0) {
            Ok(d) => d,
            Err(e) if code_is(&e, ErrorNumber::NoNetwork) => return Ok(None),
            Err(e) => return Err(fail("read", "network", &name, e)),
        };
        let owner = xml::owner_tag_in_object(&desc);
        if !name.starts_with(prefix) && owner.is_none() {
            return Ok(None);
        }
        Ok(Some(ObservedNetwork {
            active: net.is_active().unwrap_or(false),
            bridge: xml::network_bridge(&desc),
            name,
            owner,
        }))
    }

    /// Create (or refill) a raw volume and stream `data` into it.
    fn upload_into(
        &self,
        pool: &StoragePool,
        pool_name: &str,
        name: &str,
        data: &[u8],
    ) -> Result<()> {
        let len = data.len() as u64;
        let existing = Self::lookup_volume(pool, pool_name, name)?;
        // A volume made by an older klab may be world-readable (0644); seeds hold host private keys,
        // so such a volume is recreated owner-only instead of refilled.
        let reusable = |vol: &StorageVol| {
            vol.info().map(|i| i.capacity == len).unwrap_or(false)
                && vol
                    .xml_desc(0)
                    .ok()
                    .and_then(|d| xml::target_mode(&d))
                    .is_some_and(|m| m & 0o077 == 0)
        };
        let vol = match existing {
            Some(vol) if reusable(&vol) => vol,
            other => {
                if let Some(old) = other {
                    old.delete(0)
                        .map_err(|e| fail("replace", "volume", name, e))?;
                }
                StorageVol::create_xml(pool, &xml::raw_volume_xml(name, len), 0)
                    .map_err(|e| fail("create", "volume", name, e))?
            }
        };
        if data.is_empty() {
            // Length 0 means "to the end of the volume" to virStorageVolUpload.
            return Ok(());
        }
        let result = self.stream_upload(&vol, name, data);
        if result.is_err()
            && let Err(e) = vol.delete(0)
        {
            warn!(
                volume = name,
                error = e.message(),
                "could not delete half-written volume"
            );
        }
        result
    }

    /// A pool made by an older klab has a 0755 directory and 0644 volumes, so any local user can
    /// read the seeds (host private keys) and the guests' disks. The XML now asks for 0711 and 0600,
    /// but libvirt applies that only when it creates the directory or a volume; on a local
    /// connection klab tightens what is already there.
    fn tighten_pool_dir(&self, pool: &StoragePool, name: &str) {
        use std::os::unix::fs::PermissionsExt;
        if !is_local_uri(&self.uri) {
            return;
        }
        let Some(dir) = pool
            .xml_desc(0)
            .ok()
            .and_then(|d| xml::pool_target_path(&d))
        else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let tighten = |path: &std::path::Path, mode: u32| {
            let Ok(md) = std::fs::symlink_metadata(path) else {
                return;
            };
            if md.permissions().mode() & 0o066 == 0 {
                return;
            }
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
                Ok(()) => info!(pool = name, path = %path.display(), "made {mode:04o}"),
                Err(e) => {
                    warn!(pool = name, path = %path.display(), error = %e, "cannot make {mode:04o}")
                }
            }
        };
        if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return;
        }
        tighten(&dir, 0o711);
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                tighten(&entry.path(), xml::PRIVATE_VOLUME_MODE);
            }
        }
    }

    fn stream_upload(&self, vol: &StorageVol, name: &str, data: &[u8]) -> Result<()> {
        let stream = Stream::new(self.conn()?, 0)
            .map_err(|e| fail("open upload stream for", "volume", name, e))?;
        if let Err(e) = vol.upload(&stream, 0, data.len() as u64, 0) {
            // The stream never started, so there is nothing to abort.
            return Err(if unsupported(&e) {
                BackendError::Unsupported {
                    op: "upload",
                    kind: "volume",
                    name: name.to_string(),
                    backend: format!("libvirt at {}", self.uri),
                }
            } else {
                fail("upload", "volume", name, e)
            });
        }
        let mut sent = 0;
        while sent < data.len() {
            let end = (sent + UPLOAD_CHUNK).min(data.len());
            match stream.send(&data[sent..end]) {
                // A blocking stream may accept fewer bytes than offered.
                Ok(n) if n > 0 => sent += n as usize,
                Ok(_) => {
                    let _ = stream.abort();
                    return Err(BackendError::op(
                        "upload",
                        "volume",
                        name,
                        format!("stream accepted no data after {sent} bytes"),
                    ));
                }
                Err(e) => {
                    let _ = stream.abort();
                    return Err(fail("upload", "volume", name, e));
                }
            }
        }
        stream
            .finish()
            .map_err(|e| fail("finish upload of", "volume", name, e))
    }
}

impl Backend for LibvirtBackend {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn accel_support(&self) -> Result<AccelSupport> {
        let caps = self.conn()?.capabilities().map_err(|e| {
            BackendError::Other(format!(
                "read capabilities of {}: {}",
                self.uri,
                e.message()
            ))
        })?;
        xml::accel_from_capabilities(&caps)
            .map_err(|e| BackendError::Other(format!("capabilities of {}: {e}", self.uri)))
    }

    fn observe(&self, prefix: &str) -> Result<Observed> {
        let conn = self.conn()?;
        let mut observed = Observed::default();

        let domains = conn
            .list_all_domains(0)
            .map_err(|e| BackendError::Other(format!("list domains: {}", e.message())))?;
        for dom in &domains {
            if let Some(d) = self.observe_domain(dom, prefix)? {
                observed.domains.push(d);
            }
        }

        let networks = conn
            .list_all_networks(0)
            .map_err(|e| BackendError::Other(format!("list networks: {}", e.message())))?;
        for net in &networks {
            if let Some(n) = Self::observe_network(net, prefix)? {
                observed.networks.push(n);
            }
        }

        let pools = conn
            .list_all_storage_pools(0)
            .map_err(|e| BackendError::Other(format!("list storage pools: {}", e.message())))?;
        let domain_disks: Vec<&str> = observed
            .domains
            .iter()
            .flat_map(|d| d.disks.iter().map(String::as_str))
            .collect();
        for pool in &pools {
            let Ok(name) = pool.name() else { continue };
            let path = pool
                .xml_desc(0)
                .ok()
                .and_then(|d| xml::pool_target_path(&d));
            let active = pool.is_active().unwrap_or(false);
            let volumes = match Self::pool_volumes(pool, &name) {
                Ok(v) => v,
                Err(e) if name.starts_with(prefix) => return Err(e),
                Err(e) => {
                    debug!(pool = %name, error = %e, "skipping pool");
                    continue;
                }
            };
            let owner = volumes
                .iter()
                .find_map(|(v, _)| xml::lab_from_tag_volume(v))
                .map(str::to_string);
            let ours = name.starts_with(prefix) || owner.is_some();
            // In a pool that is not ours, only volumes our domains use are of interest.
            for (vol, vol_path) in &volumes {
                if ours || domain_disks.contains(&vol_path.as_str()) {
                    observed.volumes.push(ObservedVolume {
                        pool: name.clone(),
                        name: vol.clone(),
                        path: vol_path.clone(),
                    });
                }
            }
            if ours {
                observed.pools.push(ObservedPool {
                    name,
                    path,
                    active,
                    owner,
                });
            }
        }
        observed.domains.sort_by(|a, b| a.name.cmp(&b.name));
        observed.networks.sort_by(|a, b| a.name.cmp(&b.name));
        observed.pools.sort_by(|a, b| a.name.cmp(&b.name));
        observed
            .volumes
            .sort_by(|a, b| (&a.pool, &a.name).cmp(&(&b.pool, &b.name)));
        Ok(observed)
    }

    fn ensure_network(&self, name: &str, xml: &str) -> Result<()> {
        xml::check_name("define", "network", name, xml)?;
        let net = match self.lookup_network(name)? {
            Some(net) => {
                if net
                    .is_active()
                    .map_err(|e| fail("inspect", "network", name, e))?
                {
                    debug!(network = name, "network already active");
                    return Ok(());
                }
                net.create()
                    .map_err(|e| fail("start", "network", name, e))?;
                net
            }
            None => {
                let net = self
                    .conn()?
                    .define_network_xml(xml)
                    .map_err(|e| fail("define", "network", name, e))?;
                if let Err(e) = net.create() {
                    // Leave nothing half-made: a retry defines it again from the (fixed) XML.
                    if let Err(u) = net.undefine() {
                        warn!(
                            network = name,
                            error = u.message(),
                            "undefine after failed start"
                        );
                    }
                    return Err(fail("start", "network", name, e));
                }
                info!(network = name, "network defined and started");
                net
            }
        };
        if let Err(e) = net.set_autostart(false) {
            debug!(
                network = name,
                error = e.message(),
                "could not clear autostart"
            );
        }
        Ok(())
    }

    fn remove_network(&self, name: &str) -> Result<()> {
        let Some(net) = self.lookup_network(name)? else {
            return Ok(());
        };
        if net.is_active().unwrap_or(false)
            && let Err(e) = net.destroy()
            && !code_is(&e, ErrorNumber::OperationInvalid)
            && !code_is(&e, ErrorNumber::NoNetwork)
        {
            return Err(fail("stop", "network", name, e));
        }
        match net.undefine() {
            Ok(()) => {}
            // Transient networks vanish on destroy.
            Err(e) if code_is(&e, ErrorNumber::NoNetwork) => {}
            Err(e)
                if code_is(&e, ErrorNumber::OperationInvalid)
                    && self.lookup_network(name)?.is_none() => {}
            Err(e) => return Err(fail("undefine", "network", name, e)),
        }
        info!(network = name, "network removed");
        Ok(())
    }

    fn ensure_pool(&self, name: &str, xml: &str, lab: &str) -> Result<()> {
        xml::check_name("define", "pool", name, xml)?;
        let tag = pool_tag_volume(lab);
        let pool = match self.lookup_pool(name)? {
            Some(pool) => {
                let active = pool
                    .is_active()
                    .map_err(|e| fail("inspect", "pool", name, e))?;
                // The directory may have gone missing; build recreates it.
                if !active && pool.create(0).is_err() {
                    pool.build(0).map_err(|e| fail("build", "pool", name, e))?;
                    pool.create(0).map_err(|e| fail("start", "pool", name, e))?;
                }
                let volumes = Self::pool_volumes(&pool, name)?;
                if volumes.iter().any(|(v, _)| *v == tag) {
                    self.tighten_pool_dir(&pool, name);
                    return Ok(());
                }
                if let Some(other) = volumes
                    .iter()
                    .find_map(|(v, _)| xml::lab_from_tag_volume(v))
                {
                    return Err(BackendError::op(
                        "claim",
                        "pool",
                        name,
                        format!("it belongs to lab `{other}`"),
                    ));
                }
                if !volumes.is_empty() {
                    return Err(BackendError::op(
                        "claim",
                        "pool",
                        name,
                        "it exists without klab's ownership tag and holds volumes; not taking it over",
                    ));
                }
                pool
            }
            None => {
                let pool = self
                    .conn()?
                    .define_storage_pool_xml(xml, 0)
                    .map_err(|e| fail("define", "pool", name, e))?;
                let started = pool
                    .build(0)
                    .map_err(|e| fail("build", "pool", name, e))
                    .and_then(|()| pool.create(0).map_err(|e| fail("start", "pool", name, e)));
                if let Err(e) = started {
                    if let Err(u) = pool.undefine() {
                        warn!(
                            pool = name,
                            error = u.message(),
                            "undefine after failed start"
                        );
                    }
                    return Err(e);
                }
                info!(pool = name, "pool defined and started");
                pool
            }
        };
        crate::exec::crash_point("pool-untagged");
        // Keeps the pool (and so its tag) visible after a host reboot.
        if let Err(e) = pool.set_autostart(true) {
            debug!(pool = name, error = e.message(), "could not set autostart");
        }
        match StorageVol::create_xml(&pool, &xml::raw_volume_xml(&tag, 0), 0) {
            Ok(_) => Ok(()),
            Err(e) if code_is(&e, ErrorNumber::StorageVolExist) => Ok(()),
            Err(e) => Err(fail("tag", "pool", name, e)),
        }
    }

    fn remove_pool(&self, name: &str) -> Result<()> {
        let Some(pool) = self.lookup_pool(name)? else {
            return Ok(());
        };
        // An inactive pool hides its volumes; start it to check what is inside.
        if !pool.is_active().unwrap_or(false) && pool.create(0).is_err() {
            debug!(
                pool = name,
                "inactive pool could not be started; undefining it"
            );
            pool.undefine()
                .map_err(|e| fail("undefine", "pool", name, e))?;
            return Ok(());
        }
        let volumes = Self::pool_volumes(&pool, name)?;
        let (tags, others): (Vec<_>, Vec<_>) = volumes
            .into_iter()
            .partition(|(v, _)| xml::lab_from_tag_volume(v).is_some());
        if !others.is_empty() {
            let names: Vec<&str> = others.iter().map(|(v, _)| v.as_str()).collect();
            return Err(BackendError::op(
                "remove",
                "pool",
                name,
                format!("it still holds volumes: {}", names.join(", ")),
            ));
        }
        for (tag, _) in &tags {
            if let Some(vol) = Self::lookup_volume(&pool, name, tag)? {
                vol.delete(0)
                    .map_err(|e| fail("delete", "volume", tag, e))?;
            }
        }
        pool.destroy().map_err(|e| fail("stop", "pool", name, e))?;
        pool.delete(0)
            .map_err(|e| fail("delete directory of", "pool", name, e))?;
        pool.undefine()
            .map_err(|e| fail("undefine", "pool", name, e))?;
        info!(pool = name, "pool removed");
        Ok(())
    }

    fn create_volume(&self, pool: &str, xml: &str) -> Result<()> {
        let name = xml::object_name(xml).ok_or_else(|| {
            BackendError::op("create", "volume", pool, "the volume XML has no <name>")
        })?;
        let p = self.existing_pool("create", pool, &name)?;
        if Self::lookup_volume(&p, pool, &name)?.is_some() {
            debug!(pool, volume = %name, "volume exists");
            return Ok(());
        }
        match StorageVol::create_xml(&p, xml, 0) {
            Ok(_) => {
                info!(pool, volume = %name, "volume created");
                Ok(())
            }
            Err(e) if code_is(&e, ErrorNumber::StorageVolExist) => Ok(()),
            Err(e) => Err(fail("create", "volume", &name, e)),
        }
    }

    fn upload_volume(&self, pool: &str, name: &str, data: &[u8]) -> Result<()> {
        let p = self.existing_pool("upload", pool, name)?;
        self.upload_into(&p, pool, name, data)?;
        info!(pool, volume = name, bytes = data.len(), "volume uploaded");
        Ok(())
    }

    fn remove_volume(&self, pool: &str, name: &str) -> Result<()> {
        let Some(p) = self.lookup_pool(pool)? else {
            return Ok(());
        };
        let Some(vol) = Self::lookup_volume(&p, pool, name)? else {
            return Ok(());
        };
        match vol.delete(0) {
            Ok(()) => {
                info!(pool, volume = name, "volume removed");
                Ok(())
            }
            Err(e) if code_is(&e, ErrorNumber::NoStorageVolume) => Ok(()),
            Err(e) => Err(fail("delete", "volume", name, e)),
        }
    }

    fn define_and_start(&self, name: &str, xml: &str) -> Result<()> {
        xml::check_name("define", "domain", name, xml)?;
        if let Some(dom) = self.lookup_domain(name)? {
            if dom
                .is_active()
                .map_err(|e| fail("inspect", "domain", name, e))?
            {
                debug!(domain = name, "domain already running");
                return Ok(());
            }
            dom.create().map_err(|e| fail("start", "domain", name, e))?;
            info!(domain = name, "existing domain started");
            return Ok(());
        }
        let dom = self
            .conn()?
            .define_domain_xml(xml)
            .map_err(|e| fail("define", "domain", name, e))?;
        if let Err(e) = dom.create() {
            // Undefine so that a retry defines it again from the (possibly fixed) XML.
            if let Err(u) = dom.undefine() {
                warn!(
                    domain = name,
                    error = u.message(),
                    "undefine after failed start"
                );
            }
            return Err(fail("start", "domain", name, e));
        }
        info!(domain = name, "domain defined and started");
        Ok(())
    }

    fn start_domain(&self, name: &str) -> Result<()> {
        let dom = self
            .lookup_domain(name)?
            .ok_or_else(|| BackendError::op("start", "domain", name, "it does not exist"))?;
        if dom
            .is_active()
            .map_err(|e| fail("inspect", "domain", name, e))?
        {
            return Ok(());
        }
        dom.create().map_err(|e| fail("start", "domain", name, e))?;
        info!(domain = name, "domain started");
        Ok(())
    }

    fn stop_domain(&self, name: &str) -> Result<()> {
        let Some(dom) = self.lookup_domain(name)? else {
            return Ok(());
        };
        if dom.is_active().unwrap_or(false)
            && let Err(e) = dom.destroy()
            && !code_is(&e, ErrorNumber::OperationInvalid)
        {
            return Err(fail("stop", "domain", name, e));
        }
        info!(domain = name, "domain stopped");
        Ok(())
    }

    fn suspend_domain(&self, name: &str) -> Result<()> {
        let dom = self
            .lookup_domain(name)?
            .ok_or_else(|| BackendError::op("suspend", "domain", name, "no such domain"))?;
        dom.suspend()
            .map_err(|e| fail("suspend", "domain", name, e))
    }

    fn resume_domain(&self, name: &str) -> Result<()> {
        let dom = self
            .lookup_domain(name)?
            .ok_or_else(|| BackendError::op("resume", "domain", name, "no such domain"))?;
        dom.resume().map_err(|e| fail("resume", "domain", name, e))
    }

    fn create_snapshot(&self, domain: &str, xml: &str) -> Result<()> {
        let dom = self
            .lookup_domain(domain)?
            .ok_or_else(|| BackendError::op("snapshot", "domain", domain, "no such domain"))?;
        dom.create_snapshot_xml(xml, sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
            .map(|_| ())
            .map_err(|e| fail("snapshot", "domain", domain, e))
    }

    fn revert_snapshot(&self, domain: &str, name: &str) -> Result<()> {
        let dom = self
            .lookup_domain(domain)?
            .ok_or_else(|| BackendError::op("revert", "domain", domain, "no such domain"))?;
        let snap = Domain::lookup_snapshot_by_name(&dom, name, 0)
            .map_err(|e| fail("revert", "domain", domain, e))?;
        snap.revert(sys::VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED | sys::VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)
            .map_err(|e| fail("revert", "domain", domain, e))
    }

    fn delete_snapshot(&self, domain: &str, name: &str) -> Result<()> {
        let Some(dom) = self.lookup_domain(domain)? else {
            return Ok(());
        };
        match Domain::lookup_snapshot_by_name(&dom, name, 0) {
            Ok(snap) => snap
                .delete(0)
                .map_err(|e| fail("delete a snapshot of", "domain", domain, e)),
            Err(e) if code_is(&e, ErrorNumber::NoDomainSnapshot) => Ok(()),
            Err(e) => Err(fail("delete a snapshot of", "domain", domain, e)),
        }
    }

    fn list_snapshots(&self, domain: &str) -> Result<Vec<String>> {
        let Some(dom) = self.lookup_domain(domain)? else {
            return Ok(Vec::new());
        };
        let snaps = dom
            .list_all_snapshots(0)
            .map_err(|e| fail("list snapshots of", "domain", domain, e))?;
        Ok(snaps.iter().filter_map(|s| s.name().ok()).collect())
    }

    fn domain_state(&self, name: &str) -> Result<Option<DomainState>> {
        let Some(dom) = self.lookup_domain(name)? else {
            return Ok(None);
        };
        match dom.state() {
            Ok((state, _)) => Ok(Some(map_state(state))),
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(fail("read state of", "domain", name, e)),
        }
    }

    fn remove_domain(&self, name: &str) -> Result<()> {
        let Some(dom) = self.lookup_domain(name)? else {
            return Ok(());
        };
        if dom.is_active().unwrap_or(false)
            && let Err(e) = dom.destroy()
            && !code_is(&e, ErrorNumber::OperationInvalid)
            && !code_is(&e, ErrorNumber::NoDomain)
        {
            return Err(fail("stop", "domain", name, e));
        }
        let all = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        let result = match dom.undefine_flags(all) {
            Err(e) if unsupported(&e) => {
                // Some drivers (the test driver) reject the NVRAM flag.
                debug!(
                    domain = name,
                    error = e.message(),
                    "undefine flags rejected; plain undefine"
                );
                dom.undefine()
            }
            other => other,
        };
        match result {
            Ok(()) => {}
            // A transient domain is gone once destroyed.
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => {}
            Err(e) if self.lookup_domain(name)?.is_none() => {
                debug!(
                    domain = name,
                    error = e.message(),
                    "domain vanished while undefining"
                );
            }
            Err(e) => return Err(fail("undefine", "domain", name, e)),
        }
        info!(domain = name, "domain removed");
        Ok(())
    }
}

#[cfg(test)]
mod pool_dir_tests {
    use super::is_local_uri;

    #[test]
    fn only_local_uris_have_pool_paths_on_this_host() {
        assert!(is_local_uri("qemu:///system"));
        assert!(is_local_uri("qemu+unix:///system"));
        assert!(!is_local_uri("qemu+ssh://host/system"));
        assert!(!is_local_uri("qemu://host/system"));
        assert!(!is_local_uri("qemu+tcp:///system"));
    }
}
