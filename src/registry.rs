//! The host-wide registry of the subnets every lab and copy on this host uses:
//! `<data>/registry.json`, read and changed only under the lock `<data>/registry.lock`. `up` claims
//! a lab's networks (refusing, with both names, one that overlaps another lab's), copies take their
//! subnets clear of every entry, `down` releases the entry.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

pub const REGISTRY_VERSION: u32 = 1;
/// How long a command waits for another klab that holds the registry (it only reads and writes a
/// small file under it).
const LOCK_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged ({message}); it lists which subnets the labs on this host use")]
    Corrupt { path: PathBuf, message: String },
    #[error("another klab holds {path} (waited {secs} s)")]
    Locked { path: PathBuf, secs: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// (network key, CIDR) in the lab file's order.
    pub networks: Vec<(String, Ipv4Network)>,
    /// For a copy: the lab it copies and its copy name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_of: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entries {
    pub version: u32,
    #[serde(default)]
    pub labs: BTreeMap<String, Entry>,
}

impl Default for Entries {
    fn default() -> Self {
        Self {
            version: REGISTRY_VERSION,
            labs: BTreeMap::new(),
        }
    }
}

impl Entries {
    /// Every subnet other labs use.
    pub fn taken_by_others(&self, lab: &str) -> Vec<Ipv4Network> {
        self.labs
            .iter()
            .filter(|(name, _)| name.as_str() != lab)
            .flat_map(|(_, e)| e.networks.iter().map(|(_, n)| *n))
            .collect()
    }

    /// PURE: why `networks` cannot be `lab`'s: each overlap with another lab's network, named.
    pub fn conflicts(&self, lab: &str, networks: &[(String, Ipv4Network)]) -> Vec<String> {
        let mut out = Vec::new();
        for (key, net) in networks {
            for (other, e) in self.labs.iter().filter(|(n, _)| n.as_str() != lab) {
                for (okey, onet) in &e.networks {
                    if net.contains(onet.network()) || onet.contains(net.network()) {
                        out.push(format!(
                            "network `{key}` {net} of lab `{lab}` overlaps network `{okey}` {onet} of lab `{other}`"
                        ));
                    }
                }
            }
        }
        out
    }

    /// The copies of `lab`, by copy name.
    pub fn copies_of(&self, lab: &str) -> Vec<(String, String)> {
        self.labs
            .iter()
            .filter(|(_, e)| e.copy_of.as_deref() == Some(lab))
            .map(|(name, e)| (e.copy.clone().unwrap_or_default(), name.clone()))
            .collect()
    }
}

/// The registry under a data directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

/// Held while the registry is read and changed.
pub struct Guard {
    _lock: File,
    path: PathBuf,
    pub entries: Entries,
}

impl Registry {
    pub fn new(data_root: &Path) -> Self {
        Self {
            dir: data_root.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    /// Reads the registry without the lock (for listings).
    pub fn read(&self) -> Result<Entries, RegistryError> {
        read_entries(&self.path())
    }

    /// Takes the lock (waiting a little for another klab) and reads the registry.
    pub fn lock(&self) -> Result<Guard, RegistryError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { path, what, source }
        };
        fs::create_dir_all(&self.dir).map_err(io("cannot create", &self.dir))?;
        let lock_path = self.dir.join("registry.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(RegistryError::Locked {
                        path: lock_path,
                        secs: LOCK_WAIT.as_secs(),
                    });
                }
                Err(fs::TryLockError::Error(e)) => return Err(io("cannot lock", &lock_path)(e)),
            }
        }
        let path = self.path();
        let entries = read_entries(&path)?;
        Ok(Guard {
            _lock: file,
            path,
            entries,
        })
    }
}

fn read_entries(path: &Path) -> Result<Entries, RegistryError> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| RegistryError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Entries::default()),
        Err(source) => Err(RegistryError::Io {
            path: path.to_path_buf(),
            what: "cannot read",
            source,
        }),
    }
}

impl Guard {
    /// Writes the registry atomically (the lock is still held).
    pub fn save(&self) -> Result<(), RegistryError> {
        let tmp = self.path.with_extension("json.tmp");
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { path, what, source }
        };
        let text = serde_json::to_string_pretty(&self.entries).unwrap_or_default();
        {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(io("cannot write", &tmp))?;
            f.write_all(text.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(io("cannot write", &tmp))?;
        }
        fs::rename(&tmp, &self.path).map_err(io("cannot write", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn overlaps_name_both_labs_and_copies_are_found() {
        let mut e = Entries::default();
        e.labs.insert(
            "demo-1".into(),
            Entry {
                networks: vec![("outside".into(), net("10.240.3.0/24"))],
                copy_of: Some("demo".into()),
                copy: Some("1".into()),
            },
        );
        let c = e.conflicts("other", &[("lan".into(), net("10.240.0.0/22"))]);
        assert_eq!(
            c,
            [
                "network `lan` 10.240.0.0/22 of lab `other` overlaps network `outside` 10.240.3.0/24 of lab `demo-1`"
            ]
        );
        // Its own entry is no conflict; disjoint ones neither.
        assert!(
            e.conflicts("demo-1", &[("outside".into(), net("10.240.3.0/24"))])
                .is_empty()
        );
        assert!(
            e.conflicts("x", &[("a".into(), net("10.240.4.0/24"))])
                .is_empty()
        );
        assert_eq!(
            e.copies_of("demo"),
            [("1".to_string(), "demo-1".to_string())]
        );
        assert_eq!(e.taken_by_others("x"), [net("10.240.3.0/24")]);
    }

    #[test]
    fn saved_under_the_lock_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new(dir.path());
        {
            let mut g = r.lock().unwrap();
            g.entries.labs.insert(
                "a".into(),
                Entry {
                    networks: vec![("n".into(), net("10.0.0.0/24"))],
                    copy_of: None,
                    copy: None,
                },
            );
            g.save().unwrap();
        }
        assert_eq!(r.read().unwrap().labs.len(), 1);
        std::fs::write(r.path(), "{").unwrap();
        assert!(matches!(r.lock(), Err(RegistryError::Corrupt { .. })));
    }
}
