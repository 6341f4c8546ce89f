//! In-memory backend for tests: domains, networks, pools and volumes kept in a map, ownership
//! tags parsed from the XML it is given (same parser as the libvirt backend), a log of every
//! call, and hooks to add foreign objects, delete objects behind klab's back, and fail the N-th
//! call of an operation. Clones share one world. Snapshots are kept per domain with the state
//! the domain had when it was taken; a revert leaves the domain paused, as klab asks libvirt to.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::xml::{self, DiskSource};
use super::{
    AccelSupport, Backend, BackendError, DomainState, Observed, ObservedDomain, ObservedNetwork,
    ObservedNic, ObservedPool, ObservedVolume, OwnerTag, Result, pool_tag_volume,
};

/// A domain as the fake holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDomain {
    pub name: String,
    pub xml: String,
    pub owner: Option<OwnerTag>,
    pub state: DomainState,
    /// Networks whose bridge this running domain's NIC fell off (the network was stopped under
    /// it), as libvirt leaves a tap device when its network is destroyed.
    pub detached: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeNetwork {
    pub name: String,
    pub xml: String,
    pub owner: Option<OwnerTag>,
    pub active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeVolume {
    pub name: String,
    pub path: String,
    /// The XML it was created from (`None` for uploads and tag volumes).
    pub xml: Option<String>,
    /// Uploaded content (`None` for volumes created from XML).
    pub data: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePool {
    pub name: String,
    pub xml: String,
    pub path: Option<String>,
    pub active: bool,
    pub volumes: BTreeMap<String, FakeVolume>,
}

#[derive(Debug)]
struct World {
    accel: AccelSupport,
    domains: BTreeMap<String, FakeDomain>,
    networks: BTreeMap<String, FakeNetwork>,
    pools: BTreeMap<String, FakePool>,
    calls: Vec<String>,
    counts: HashMap<String, usize>,
    /// (op, n): the n-th call (1-based) of `op` fails.
    fail_nth: Vec<(String, usize)>,
    /// (op, object): every call of `op` on `object` fails.
    fail_object: Vec<(String, String)>,
    /// (op, delay): every call of `op` takes this long (a wedged hypervisor).
    delays: Vec<(String, std::time::Duration)>,
    /// Per domain: its snapshots' names, oldest first. They go with the domain.
    snapshots: BTreeMap<String, Vec<String>>,
}

/// The recording backend double.
#[derive(Debug, Clone)]
pub struct FakeBackend {
    world: Arc<Mutex<World>>,
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// Operations that only read; [`FakeBackend::mutations`] leaves them out.
const READ_OPS: [&str; 4] = ["accel_support", "observe", "domain_state", "list_snapshots"];

fn volume_path(pool: &FakePool, name: &str) -> String {
    match &pool.path {
        Some(dir) => format!("{}/{name}", dir.trim_end_matches('/')),
        None => format!("{}/{name}", pool.name),
    }
}

impl FakeBackend {
    /// An empty host offering TCG only (like this machine's tests assume).
    pub fn new() -> Self {
        Self::with_accel(AccelSupport {
            kvm: false,
            qemu: true,
        })
    }

    pub fn with_accel(accel: AccelSupport) -> Self {
        Self {
            world: Arc::new(Mutex::new(World {
                accel,
                domains: BTreeMap::new(),
                networks: BTreeMap::new(),
                pools: BTreeMap::new(),
                calls: Vec::new(),
                counts: HashMap::new(),
                fail_nth: Vec::new(),
                fail_object: Vec::new(),
                delays: Vec::new(),
                snapshots: BTreeMap::new(),
            })),
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        // A test that panicked while holding the lock must not hide the state from others.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_accel(&self, accel: AccelSupport) {
        self.world().accel = accel;
    }

    /// Every call so far, e.g. `ensure_network klab-demo-cluster`, `create_volume klab-demo/cp1.qcow2`.
    pub fn calls(&self) -> Vec<String> {
        self.world().calls.clone()
    }

    /// The calls that could change something (everything except `observe` and `accel_support`).
    pub fn mutations(&self) -> Vec<String> {
        self.world()
            .calls
            .iter()
            .filter(|c| !READ_OPS.iter().any(|op| c.split(' ').next() == Some(*op)))
            .cloned()
            .collect()
    }

    pub fn clear_calls(&self) {
        self.world().calls.clear();
    }

    /// Make the `nth` call (1-based, counted from the backend's creation) of `op` fail, e.g.
    /// `fail_nth("define_and_start", 2)`. The failing call changes nothing.
    pub fn fail_nth(&self, op: &str, nth: usize) {
        self.world().fail_nth.push((op.to_string(), nth));
    }

    /// Make every call of `op` on `object` fail (`object` as written in [`Self::calls`]).
    pub fn fail_object(&self, op: &str, object: &str) {
        self.world()
            .fail_object
            .push((op.to_string(), object.to_string()));
    }

    /// Make every call of `op` take `delay` before it does anything (models a wedged libvirtd).
    pub fn delay(&self, op: &str, delay: std::time::Duration) {
        self.world().delays.push((op.to_string(), delay));
    }

    fn pause(&self, op: &str) {
        let d = self
            .world()
            .delays
            .iter()
            .find(|(o, _)| o == op)
            .map(|(_, d)| *d);
        if let Some(d) = d {
            std::thread::sleep(d);
        }
    }

    // ---- foreign objects and changes behind klab's back ----

    /// Add a domain as if someone else defined it (tag read from `xml`).
    pub fn inject_domain(&self, xml: &str, state: DomainState) -> Result<()> {
        let name = xml::object_name(xml)
            .ok_or_else(|| BackendError::Other("injected domain XML has no <name>".into()))?;
        self.world().domains.insert(
            name.clone(),
            FakeDomain {
                owner: xml::owner_tag_in_object(xml),
                name,
                xml: xml.to_string(),
                state,
                detached: Vec::new(),
            },
        );
        Ok(())
    }

    pub fn inject_network(&self, xml: &str, active: bool) -> Result<()> {
        let name = xml::object_name(xml)
            .ok_or_else(|| BackendError::Other("injected network XML has no <name>".into()))?;
        self.world().networks.insert(
            name.clone(),
            FakeNetwork {
                owner: xml::owner_tag_in_object(xml),
                name,
                xml: xml.to_string(),
                active,
            },
        );
        Ok(())
    }

    pub fn inject_pool(&self, xml: &str, active: bool) -> Result<()> {
        let name = xml::object_name(xml)
            .ok_or_else(|| BackendError::Other("injected pool XML has no <name>".into()))?;
        self.world().pools.insert(
            name.clone(),
            FakePool {
                path: xml::pool_target_path(xml),
                name,
                xml: xml.to_string(),
                active,
                volumes: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Add a volume (or a tag volume, by its name) to an existing pool.
    pub fn inject_volume(&self, pool: &str, name: &str) -> Result<()> {
        let mut w = self.world();
        let p = w
            .pools
            .get_mut(pool)
            .ok_or_else(|| BackendError::Other(format!("no fake pool `{pool}`")))?;
        let path = volume_path(p, name);
        p.volumes.insert(
            name.to_string(),
            FakeVolume {
                name: name.to_string(),
                path,
                xml: None,
                data: None,
            },
        );
        Ok(())
    }

    /// Remove a domain without going through the backend (like `virsh undefine` by hand).
    pub fn delete_domain(&self, name: &str) -> bool {
        let mut w = self.world();
        w.snapshots.remove(name);
        w.domains.remove(name).is_some()
    }

    /// Drop one snapshot of a domain behind klab's back (like `virsh snapshot-delete`).
    pub fn drop_snapshot(&self, domain: &str, name: &str) -> bool {
        let mut w = self.world();
        let Some(list) = w.snapshots.get_mut(domain) else {
            return false;
        };
        let before = list.len();
        list.retain(|s| s != name);
        before != list.len()
    }

    pub fn delete_network(&self, name: &str) -> bool {
        self.world().networks.remove(name).is_some()
    }

    pub fn delete_pool(&self, name: &str) -> bool {
        self.world().pools.remove(name).is_some()
    }

    pub fn delete_volume(&self, pool: &str, name: &str) -> bool {
        self.world()
            .pools
            .get_mut(pool)
            .is_some_and(|p| p.volumes.remove(name).is_some())
    }

    /// Change a domain's state by hand (e.g. shut it off). Returns false if it does not exist.
    pub fn set_domain_state(&self, name: &str, state: DomainState) -> bool {
        match self.world().domains.get_mut(name) {
            Some(d) => {
                d.state = state;
                true
            }
            None => false,
        }
    }

    /// Start or stop a network behind klab's back. Stopping it detaches the NICs of the running
    /// domains on it, and starting it again does not re-attach them (as with `virsh net-destroy`).
    pub fn set_network_active(&self, name: &str, active: bool) -> bool {
        let mut w = self.world();
        let Some(n) = w.networks.get_mut(name) else {
            return false;
        };
        n.active = active;
        if !active {
            for d in w.domains.values_mut() {
                if d.state == DomainState::Running
                    && xml::domain_networks(&d.xml).iter().any(|x| x == name)
                    && !d.detached.iter().any(|x| x == name)
                {
                    d.detached.push(name.to_string());
                }
            }
        }
        true
    }

    // ---- inspection ----

    pub fn domain(&self, name: &str) -> Option<FakeDomain> {
        self.world().domains.get(name).cloned()
    }

    pub fn network(&self, name: &str) -> Option<FakeNetwork> {
        self.world().networks.get(name).cloned()
    }

    pub fn pool(&self, name: &str) -> Option<FakePool> {
        self.world().pools.get(name).cloned()
    }

    pub fn volume(&self, pool: &str, name: &str) -> Option<FakeVolume> {
        self.world().pools.get(pool)?.volumes.get(name).cloned()
    }

    /// The snapshots of a domain, oldest first (empty for a domain without any).
    pub fn snapshot_names(&self, domain: &str) -> Vec<String> {
        self.world()
            .snapshots
            .get(domain)
            .cloned()
            .unwrap_or_default()
    }

    pub fn domain_names(&self) -> Vec<String> {
        self.world().domains.keys().cloned().collect()
    }

    pub fn network_names(&self) -> Vec<String> {
        self.world().networks.keys().cloned().collect()
    }

    pub fn pool_names(&self) -> Vec<String> {
        self.world().pools.keys().cloned().collect()
    }
}

impl World {
    /// Log the call, then fail it if a failure was injected for it.
    fn enter(&mut self, op: &'static str, kind: &'static str, object: &str) -> Result<()> {
        self.calls.push(if object.is_empty() {
            op.to_string()
        } else {
            format!("{op} {object}")
        });
        let n = {
            let count = self.counts.entry(op.to_string()).or_insert(0);
            *count += 1;
            *count
        };
        let hit_nth = self.fail_nth.iter().any(|(o, k)| o == op && *k == n);
        let hit_object = self
            .fail_object
            .iter()
            .any(|(o, name)| o == op && name == object);
        if hit_nth || hit_object {
            return Err(BackendError::op(op, kind, object, "injected failure"));
        }
        Ok(())
    }

    fn disk_paths(&self, dom_xml: &str) -> Vec<String> {
        xml::domain_disk_sources(dom_xml)
            .into_iter()
            .map(|source| match source {
                DiskSource::File(path) => path,
                DiskSource::Volume { pool, volume } => self
                    .pools
                    .get(&pool)
                    .and_then(|p| p.volumes.get(&volume))
                    .map(|v| v.path.clone())
                    .unwrap_or_else(|| format!("{pool}/{volume}")),
            })
            .collect()
    }

    /// What libvirt would refuse at start: inactive or missing networks, missing volumes.
    fn check_startable(&self, name: &str, dom_xml: &str) -> Result<()> {
        for net in xml::domain_networks(dom_xml) {
            match self.networks.get(&net) {
                Some(n) if n.active => {}
                Some(_) => {
                    return Err(BackendError::op(
                        "start",
                        "domain",
                        name,
                        format!("network `{net}` is not active"),
                    ));
                }
                None => {
                    return Err(BackendError::op(
                        "start",
                        "domain",
                        name,
                        format!("network `{net}` does not exist"),
                    ));
                }
            }
        }
        for source in xml::domain_disk_sources(dom_xml) {
            let missing = match &source {
                DiskSource::Volume { pool, volume } => !self
                    .pools
                    .get(pool)
                    .is_some_and(|p| p.active && p.volumes.contains_key(volume)),
                // Files inside a pool directory must exist as volumes; others are not ours to check.
                DiskSource::File(path) => {
                    let in_pool = self.pools.values().find(|p| {
                        p.path
                            .as_ref()
                            .is_some_and(|d| path.starts_with(&format!("{d}/")))
                    });
                    in_pool.is_some_and(|p| !p.volumes.values().any(|v| &v.path == path))
                }
            };
            if missing {
                let what = match source {
                    DiskSource::Volume { pool, volume } => format!("{pool}/{volume}"),
                    DiskSource::File(path) => path,
                };
                return Err(BackendError::op(
                    "start",
                    "domain",
                    name,
                    format!("disk `{what}` does not exist"),
                ));
            }
        }
        Ok(())
    }

    fn domain_mut(&mut self, op: &'static str, name: &str) -> Result<&mut FakeDomain> {
        self.domains
            .get_mut(name)
            .ok_or_else(|| BackendError::op(op, "domain", name, "no such domain"))
    }

    fn active_pool(&mut self, op: &'static str, pool: &str, volume: &str) -> Result<&mut FakePool> {
        match self.pools.get_mut(pool) {
            Some(p) if p.active => Ok(p),
            Some(_) => Err(BackendError::op(
                op,
                "volume",
                volume,
                format!("pool `{pool}` is not active"),
            )),
            None => Err(BackendError::op(
                op,
                "volume",
                volume,
                format!("pool `{pool}` does not exist"),
            )),
        }
    }
}

impl Backend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn uri(&self) -> String {
        "fake:///".to_string()
    }

    fn accel_support(&self) -> Result<AccelSupport> {
        self.pause("accel_support");
        let mut w = self.world();
        w.enter("accel_support", "host", "")?;
        Ok(w.accel)
    }

    fn observe(&self, prefix: &str) -> Result<Observed> {
        self.pause("observe");
        let mut w = self.world();
        w.enter("observe", "objects", prefix)?;
        let mut observed = Observed::default();
        for d in w.domains.values() {
            if d.name.starts_with(prefix) || d.owner.is_some() {
                let nics = if d.state == DomainState::Running {
                    xml::domain_networks(&d.xml)
                        .into_iter()
                        .map(|network| ObservedNic {
                            attached: Some(!d.detached.contains(&network)),
                            network,
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                observed.domains.push(ObservedDomain {
                    name: d.name.clone(),
                    owner: d.owner.clone(),
                    state: d.state,
                    disks: w.disk_paths(&d.xml),
                    nics,
                });
            }
        }
        for n in w.networks.values() {
            if n.name.starts_with(prefix) || n.owner.is_some() {
                observed.networks.push(ObservedNetwork {
                    name: n.name.clone(),
                    owner: n.owner.clone(),
                    active: n.active,
                    bridge: xml::network_bridge(&n.xml),
                });
            }
        }
        let domain_disks: Vec<String> = observed
            .domains
            .iter()
            .flat_map(|d| d.disks.iter().cloned())
            .collect();
        for p in w.pools.values() {
            // Like libvirt: an inactive pool's volumes (and so its tag) cannot be seen.
            let visible: Vec<&FakeVolume> = if p.active {
                p.volumes.values().collect()
            } else {
                Vec::new()
            };
            let owner = visible
                .iter()
                .find_map(|v| xml::lab_from_tag_volume(&v.name))
                .map(str::to_string);
            let ours = p.name.starts_with(prefix) || owner.is_some();
            for v in &visible {
                if ours || domain_disks.contains(&v.path) {
                    observed.volumes.push(ObservedVolume {
                        pool: p.name.clone(),
                        name: v.name.clone(),
                        path: v.path.clone(),
                    });
                }
            }
            if ours {
                observed.pools.push(ObservedPool {
                    name: p.name.clone(),
                    path: p.path.clone(),
                    active: p.active,
                    owner,
                });
            }
        }
        Ok(observed)
    }

    fn ensure_network(&self, name: &str, xml: &str) -> Result<()> {
        self.pause("ensure_network");
        let mut w = self.world();
        w.enter("ensure_network", "network", name)?;
        xml::check_name("define", "network", name, xml)?;
        match w.networks.get_mut(name) {
            Some(n) => n.active = true,
            None => {
                w.networks.insert(
                    name.to_string(),
                    FakeNetwork {
                        name: name.to_string(),
                        xml: xml.to_string(),
                        owner: xml::owner_tag_in_object(xml),
                        active: true,
                    },
                );
            }
        }
        Ok(())
    }

    fn remove_network(&self, name: &str) -> Result<()> {
        self.pause("remove_network");
        let mut w = self.world();
        w.enter("remove_network", "network", name)?;
        w.networks.remove(name);
        Ok(())
    }

    fn ensure_pool(&self, name: &str, xml: &str, lab: &str) -> Result<()> {
        self.pause("ensure_pool");
        let mut w = self.world();
        w.enter("ensure_pool", "pool", name)?;
        xml::check_name("define", "pool", name, xml)?;
        let tag = pool_tag_volume(lab);
        let pool = w.pools.entry(name.to_string()).or_insert_with(|| FakePool {
            name: name.to_string(),
            xml: xml.to_string(),
            path: xml::pool_target_path(xml),
            active: true,
            volumes: BTreeMap::new(),
        });
        pool.active = true;
        if pool.volumes.contains_key(&tag) {
            return Ok(());
        }
        if let Some(other) = pool
            .volumes
            .keys()
            .find_map(|v| xml::lab_from_tag_volume(v))
        {
            return Err(BackendError::op(
                "claim",
                "pool",
                name,
                format!("it belongs to lab `{other}`"),
            ));
        }
        if !pool.volumes.is_empty() {
            return Err(BackendError::op(
                "claim",
                "pool",
                name,
                "it exists without klab's ownership tag and holds volumes; not taking it over",
            ));
        }
        let path = volume_path(pool, &tag);
        pool.volumes.insert(
            tag.clone(),
            FakeVolume {
                name: tag,
                path,
                xml: None,
                data: Some(Vec::new()),
            },
        );
        Ok(())
    }

    fn remove_pool(&self, name: &str) -> Result<()> {
        self.pause("remove_pool");
        let mut w = self.world();
        w.enter("remove_pool", "pool", name)?;
        let Some(pool) = w.pools.get(name) else {
            return Ok(());
        };
        let others: Vec<&str> = pool
            .volumes
            .keys()
            .filter(|v| xml::lab_from_tag_volume(v).is_none())
            .map(String::as_str)
            .collect();
        if !others.is_empty() {
            return Err(BackendError::op(
                "remove",
                "pool",
                name,
                format!("it still holds volumes: {}", others.join(", ")),
            ));
        }
        w.pools.remove(name);
        Ok(())
    }

    fn create_volume(&self, pool: &str, xml: &str) -> Result<()> {
        let name = xml::object_name(xml).unwrap_or_default();
        self.pause("create_volume");
        let mut w = self.world();
        w.enter("create_volume", "volume", &format!("{pool}/{name}"))?;
        if name.is_empty() {
            return Err(BackendError::op(
                "create",
                "volume",
                pool,
                "the volume XML has no <name>",
            ));
        }
        let p = w.active_pool("create", pool, &name)?;
        if !p.volumes.contains_key(&name) {
            let path = volume_path(p, &name);
            p.volumes.insert(
                name.clone(),
                FakeVolume {
                    name,
                    path,
                    xml: Some(xml.to_string()),
                    data: None,
                },
            );
        }
        Ok(())
    }

    fn upload_volume(&self, pool: &str, name: &str, data: &[u8]) -> Result<()> {
        self.pause("upload_volume");
        let mut w = self.world();
        w.enter("upload_volume", "volume", &format!("{pool}/{name}"))?;
        let p = w.active_pool("upload", pool, name)?;
        let path = volume_path(p, name);
        p.volumes.insert(
            name.to_string(),
            FakeVolume {
                name: name.to_string(),
                path,
                xml: None,
                data: Some(data.to_vec()),
            },
        );
        Ok(())
    }

    fn remove_volume(&self, pool: &str, name: &str) -> Result<()> {
        self.pause("remove_volume");
        let mut w = self.world();
        w.enter("remove_volume", "volume", &format!("{pool}/{name}"))?;
        if let Some(p) = w.pools.get_mut(pool) {
            p.volumes.remove(name);
        }
        Ok(())
    }

    fn define_and_start(&self, name: &str, xml: &str) -> Result<()> {
        self.pause("define_and_start");
        let mut w = self.world();
        w.enter("define_and_start", "domain", name)?;
        xml::check_name("define", "domain", name, xml)?;
        let existing = w.domains.get(name).map(|d| (d.state, d.xml.clone()));
        match existing {
            Some((DomainState::Running, _)) => Ok(()),
            Some((_, old_xml)) => {
                w.check_startable(name, &old_xml)?;
                if let Some(d) = w.domains.get_mut(name) {
                    d.state = DomainState::Running;
                }
                Ok(())
            }
            None => {
                // libvirt undefines nothing on a failed start, but our libvirt backend does:
                // a failed start leaves no domain behind.
                w.check_startable(name, xml)?;
                w.domains.insert(
                    name.to_string(),
                    FakeDomain {
                        name: name.to_string(),
                        xml: xml.to_string(),
                        owner: xml::owner_tag_in_object(xml),
                        state: DomainState::Running,
                        detached: Vec::new(),
                    },
                );
                Ok(())
            }
        }
    }

    fn start_domain(&self, name: &str) -> Result<()> {
        self.pause("start_domain");
        let mut w = self.world();
        w.enter("start_domain", "domain", name)?;
        let Some(dom_xml) = w.domains.get(name).map(|d| d.xml.clone()) else {
            return Err(BackendError::op(
                "start",
                "domain",
                name,
                "it does not exist",
            ));
        };
        let running = w.domains.get(name).map(|d| d.state) == Some(DomainState::Running);
        if running {
            return Ok(());
        }
        w.check_startable(name, &dom_xml)?;
        if let Some(d) = w.domains.get_mut(name) {
            d.state = DomainState::Running;
            d.detached.clear();
        }
        Ok(())
    }

    fn stop_domain(&self, name: &str) -> Result<()> {
        self.pause("stop_domain");
        let mut w = self.world();
        w.enter("stop_domain", "domain", name)?;
        if let Some(d) = w.domains.get_mut(name) {
            d.state = DomainState::Shutoff;
            d.detached.clear();
        }
        Ok(())
    }

    fn domain_state(&self, name: &str) -> Result<Option<DomainState>> {
        self.pause("domain_state");
        let mut w = self.world();
        w.enter("domain_state", "domain", name)?;
        Ok(w.domains.get(name).map(|d| d.state))
    }

    fn remove_domain(&self, name: &str) -> Result<()> {
        self.pause("remove_domain");
        let mut w = self.world();
        w.enter("remove_domain", "domain", name)?;
        w.domains.remove(name);
        // Undefined with its snapshot metadata, as the libvirt backend does.
        w.snapshots.remove(name);
        Ok(())
    }

    fn suspend_domain(&self, name: &str) -> Result<()> {
        self.pause("suspend_domain");
        let mut w = self.world();
        w.enter("suspend_domain", "domain", name)?;
        let d = w.domain_mut("suspend", name)?;
        match d.state {
            DomainState::Running | DomainState::Paused => {
                d.state = DomainState::Paused;
                Ok(())
            }
            other => Err(BackendError::op(
                "suspend",
                "domain",
                name,
                format!("domain is not running ({other:?})"),
            )),
        }
    }

    fn resume_domain(&self, name: &str) -> Result<()> {
        self.pause("resume_domain");
        let mut w = self.world();
        w.enter("resume_domain", "domain", name)?;
        let d = w.domain_mut("resume", name)?;
        // libvirt refuses to resume a domain that is not paused.
        if d.state != DomainState::Paused {
            return Err(BackendError::op(
                "resume",
                "domain",
                name,
                format!("domain is not paused ({:?})", d.state),
            ));
        }
        d.state = DomainState::Running;
        Ok(())
    }

    fn create_snapshot(&self, domain: &str, xml: &str) -> Result<()> {
        self.pause("create_snapshot");
        let mut w = self.world();
        w.enter("create_snapshot", "domain", domain)?;
        let name = xml::object_name(xml).ok_or_else(|| {
            BackendError::op("snapshot", "domain", domain, "snapshot XML has no <name>")
        })?;
        w.domain_mut("snapshot", domain)?;
        let list = w.snapshots.entry(domain.to_string()).or_default();
        if list.contains(&name) {
            return Err(BackendError::op(
                "snapshot",
                "domain",
                domain,
                format!("snapshot `{name}` already exists"),
            ));
        }
        list.push(name);
        Ok(())
    }

    fn revert_snapshot(&self, domain: &str, name: &str) -> Result<()> {
        self.pause("revert_snapshot");
        let mut w = self.world();
        w.enter("revert_snapshot", "domain", domain)?;
        let known = w
            .snapshots
            .get(domain)
            .is_some_and(|l| l.iter().any(|s| s == name));
        let d = w.domain_mut("revert", domain)?;
        if !known {
            return Err(BackendError::op(
                "revert",
                "domain",
                domain,
                format!("no domain snapshot with matching name '{name}'"),
            ));
        }
        d.state = DomainState::Paused;
        d.detached.clear();
        Ok(())
    }

    fn delete_snapshot(&self, domain: &str, name: &str) -> Result<()> {
        self.pause("delete_snapshot");
        let mut w = self.world();
        w.enter("delete_snapshot", "domain", domain)?;
        if let Some(list) = w.snapshots.get_mut(domain) {
            list.retain(|s| s != name);
        }
        Ok(())
    }

    fn list_snapshots(&self, domain: &str) -> Result<Vec<String>> {
        self.pause("list_snapshots");
        let mut w = self.world();
        w.enter("list_snapshots", "domain", domain)?;
        Ok(w.snapshots.get(domain).cloned().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::OWNER_NS;

    fn net_xml(name: &str, lab: Option<&str>) -> String {
        let meta = lab
            .map(|l| {
                format!(
                    "<metadata><klab:lab xmlns:klab='{OWNER_NS}' name='{l}' network='x'/></metadata>"
                )
            })
            .unwrap_or_default();
        format!("<network><name>{name}</name>{meta}<bridge name='kl-00000000'/></network>")
    }

    fn dom_xml(name: &str, lab: Option<&str>, pool: &str, net: &str) -> String {
        let meta = lab
            .map(|l| {
                format!(
                    "<metadata><klab:lab xmlns:klab='{OWNER_NS}' name='{l}' node='cp1'/></metadata>"
                )
            })
            .unwrap_or_default();
        format!(
            "<domain type='qemu'><name>{name}</name>{meta}<devices>\
             <disk type='volume' device='disk'><source pool='{pool}' volume='cp1.qcow2'/></disk>\
             <interface type='network'><source network='{net}'/></interface></devices></domain>"
        )
    }

    const POOL: &str =
        "<pool type='dir'><name>klab-demo</name><target><path>/p/demo</path></target></pool>";

    fn up(fake: &FakeBackend) {
        fake.ensure_pool("klab-demo", POOL, "demo").unwrap();
        fake.ensure_network("klab-demo-net", &net_xml("klab-demo-net", Some("demo")))
            .unwrap();
        fake.create_volume(
            "klab-demo",
            "<volume><name>cp1.qcow2</name><capacity>1</capacity></volume>",
        )
        .unwrap();
        fake.upload_volume("klab-demo", "cp1-seed.img", b"seed")
            .unwrap();
        fake.define_and_start(
            "klab-demo-cp1",
            &dom_xml("klab-demo-cp1", Some("demo"), "klab-demo", "klab-demo-net"),
        )
        .unwrap();
    }

    #[test]
    fn bring_up_records_calls_and_tags() {
        let fake = FakeBackend::new();
        up(&fake);
        assert_eq!(
            fake.calls(),
            vec![
                "ensure_pool klab-demo",
                "ensure_network klab-demo-net",
                "create_volume klab-demo/cp1.qcow2",
                "upload_volume klab-demo/cp1-seed.img",
                "define_and_start klab-demo-cp1",
            ]
        );
        let obs = fake.observe("klab-demo").unwrap();
        assert_eq!(obs.domains.len(), 1);
        assert_eq!(
            obs.domains[0].owner,
            Some(OwnerTag {
                lab: "demo".into(),
                node: Some("cp1".into())
            })
        );
        assert_eq!(obs.domains[0].disks, vec!["/p/demo/cp1.qcow2".to_string()]);
        assert_eq!(obs.networks[0].bridge.as_deref(), Some("kl-00000000"));
        assert_eq!(obs.pools[0].owner.as_deref(), Some("demo"));
        let vols: Vec<&str> = obs.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            vols,
            vec!["cp1-seed.img", "cp1.qcow2", "klab-owner-demo.tag"]
        );
        assert_eq!(
            fake.volume("klab-demo", "cp1-seed.img")
                .unwrap()
                .data
                .as_deref(),
            Some(&b"seed"[..])
        );
        // observe is logged but is not a mutation
        assert_eq!(fake.mutations().len(), 5);
        assert_eq!(fake.calls().len(), 6);
    }

    #[test]
    fn second_bring_up_changes_nothing() {
        let fake = FakeBackend::new();
        up(&fake);
        let before = fake.observe("klab-demo").unwrap();
        up(&fake);
        assert_eq!(fake.observe("klab-demo").unwrap(), before);
    }

    #[test]
    fn foreign_look_alikes_are_observed_untagged() {
        let fake = FakeBackend::new();
        fake.inject_network(&net_xml("klab-demo-other", None), true)
            .unwrap();
        fake.inject_domain(
            &dom_xml("klab-demo-imposter", None, "default", "klab-demo-other"),
            DomainState::Shutoff,
        )
        .unwrap();
        // a foreign namespace with our prefix is not a tag
        fake.inject_network(
            "<network><name>klab-demo-x</name><metadata><klab:lab xmlns:klab='urn:x' \
             name='demo'/></metadata></network>",
            false,
        )
        .unwrap();
        fake.inject_domain(
            "<domain><name>unrelated</name></domain>",
            DomainState::Running,
        )
        .unwrap();
        let obs = fake.observe("klab-demo").unwrap();
        assert_eq!(obs.domains.len(), 1);
        assert_eq!(obs.domains[0].owner, None);
        assert_eq!(obs.networks.len(), 2);
        assert!(obs.networks.iter().all(|n| n.owner.is_none()));
        // tagged objects are found whatever their name
        fake.inject_domain(
            &dom_xml("renamed", Some("demo"), "default", "n"),
            DomainState::Running,
        )
        .unwrap();
        let obs = fake.observe("klab-demo").unwrap();
        assert!(obs.domains.iter().any(|d| d.name == "renamed"));
    }

    #[test]
    fn start_needs_networks_and_volumes() {
        let fake = FakeBackend::new();
        fake.ensure_pool("klab-demo", POOL, "demo").unwrap();
        let xml = dom_xml("klab-demo-cp1", Some("demo"), "klab-demo", "klab-demo-net");
        let err = fake.define_and_start("klab-demo-cp1", &xml).unwrap_err();
        assert!(
            err.to_string()
                .contains("network `klab-demo-net` does not exist"),
            "{err}"
        );
        assert!(fake.domain("klab-demo-cp1").is_none());
        fake.ensure_network("klab-demo-net", &net_xml("klab-demo-net", Some("demo")))
            .unwrap();
        let err = fake.define_and_start("klab-demo-cp1", &xml).unwrap_err();
        assert!(err.to_string().contains("klab-demo/cp1.qcow2"), "{err}");
    }

    #[test]
    fn injected_failures_hit_the_nth_call_only() {
        let fake = FakeBackend::new();
        fake.fail_nth("ensure_network", 2);
        let a = net_xml("a", Some("demo"));
        let b = net_xml("b", Some("demo"));
        fake.ensure_network("a", &a).unwrap();
        let err = fake.ensure_network("b", &b).unwrap_err();
        assert!(err.to_string().contains("injected failure"));
        assert!(fake.network("b").is_none());
        fake.ensure_network("b", &b).unwrap();
        assert!(fake.network("b").is_some());

        fake.fail_object("remove_network", "a");
        assert!(fake.remove_network("a").is_err());
        assert!(fake.remove_network("b").is_ok());
    }

    #[test]
    fn behind_the_back_changes_and_idempotent_removal() {
        let fake = FakeBackend::new();
        up(&fake);
        assert!(fake.delete_domain("klab-demo-cp1"));
        assert!(fake.observe("klab-demo").unwrap().domains.is_empty());
        fake.remove_domain("klab-demo-cp1").unwrap();
        fake.remove_network("nope").unwrap();
        fake.remove_volume("nope", "x").unwrap();
        fake.remove_pool("nope").unwrap();
        assert!(fake.set_network_active("klab-demo-net", false));
        assert!(!fake.observe("klab-demo").unwrap().networks[0].active);
        fake.ensure_network("klab-demo-net", &net_xml("klab-demo-net", Some("demo")))
            .unwrap();
        assert!(fake.network("klab-demo-net").unwrap().active);
    }

    #[test]
    fn pool_removal_requires_empty_and_claim_rules() {
        let fake = FakeBackend::new();
        up(&fake);
        let err = fake.remove_pool("klab-demo").unwrap_err();
        assert!(err.to_string().contains("cp1.qcow2"), "{err}");
        fake.remove_domain("klab-demo-cp1").unwrap();
        fake.remove_volume("klab-demo", "cp1.qcow2").unwrap();
        fake.remove_volume("klab-demo", "cp1-seed.img").unwrap();
        fake.remove_pool("klab-demo").unwrap();
        assert!(fake.pool("klab-demo").is_none());

        // another lab's pool, and an untagged pool with content, are not claimed
        fake.ensure_pool("klab-demo", POOL, "other").unwrap();
        assert!(fake.ensure_pool("klab-demo", POOL, "demo").is_err());
        fake.inject_pool(
            "<pool type='dir'><name>shared</name><target><path>/s</path></target></pool>",
            true,
        )
        .unwrap();
        fake.inject_volume("shared", "disk.qcow2").unwrap();
        let shared = "<pool type='dir'><name>shared</name></pool>";
        assert!(fake.ensure_pool("shared", shared, "demo").is_err());
        assert!(fake.volume("shared", "klab-owner-demo.tag").is_none());
    }

    #[test]
    fn name_mismatch_is_refused() {
        let fake = FakeBackend::new();
        let err = fake
            .ensure_network("klab-demo-a", &net_xml("klab-demo-b", Some("demo")))
            .unwrap_err();
        assert!(err.to_string().contains("klab-demo-b"));
        assert!(fake.network_names().is_empty());
    }

    #[test]
    fn accel_is_configurable() {
        let fake = FakeBackend::with_accel(AccelSupport {
            kvm: true,
            qemu: true,
        });
        assert!(fake.accel_support().unwrap().kvm);
        fake.set_accel(AccelSupport {
            kvm: false,
            qemu: true,
        });
        assert!(!fake.accel_support().unwrap().kvm);
    }

    #[test]
    fn snapshots_pause_revert_paused_and_go_with_the_domain() {
        let fake = FakeBackend::new();
        up(&fake);
        let dom = "klab-demo-cp1";
        let snap = "<domainsnapshot><name>initial</name></domainsnapshot>";
        fake.suspend_domain(dom).unwrap();
        assert_eq!(fake.domain(dom).unwrap().state, DomainState::Paused);
        fake.create_snapshot(dom, snap).unwrap();
        let again = fake.create_snapshot(dom, snap).unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");
        fake.resume_domain(dom).unwrap();
        assert!(
            fake.resume_domain(dom).is_err(),
            "a running domain is not resumed"
        );
        assert_eq!(fake.list_snapshots(dom).unwrap(), ["initial"]);

        fake.revert_snapshot(dom, "initial").unwrap();
        assert_eq!(fake.domain(dom).unwrap().state, DomainState::Paused);
        let err = fake.revert_snapshot(dom, "other").unwrap_err();
        assert!(err.to_string().contains("other"), "{err}");
        assert!(fake.revert_snapshot("klab-demo-none", "initial").is_err());
        assert!(fake.suspend_domain("klab-demo-none").is_err());
        // Reading the list changes nothing.
        assert!(
            !fake
                .mutations()
                .iter()
                .any(|c| c.starts_with("list_snapshots"))
        );

        fake.delete_snapshot(dom, "absent").unwrap();
        assert!(fake.drop_snapshot(dom, "initial"));
        assert!(fake.snapshot_names(dom).is_empty());
        fake.create_snapshot(dom, snap).unwrap();
        fake.remove_domain(dom).unwrap();
        assert!(fake.list_snapshots(dom).unwrap().is_empty());
    }
}
