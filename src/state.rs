//! The per-lab state directory: generated keys (0600), the resolved plan, and a lock so two
//! `klab up`/`down` on one lab cannot run at once.
//!
//! Layout of `<state root>/<lab>/`:
//! `lock`, `meta.json`, `plan.json`, `journal.json`, `id_ed25519[.pub]` (the lab user's key),
//! `hostkeys/<node>[.pub]` (pre-generated host keys), `known_hosts`, `ssh_config`.
//!
//! Every JSON file carries `"version"` ([`STATE_VERSION`]); files without it come from an older
//! klab and still read, and [`DownFacts`] reads just enough of any `plan.json` to remove a lab.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::{HostKey, KeyMaterial, LabPlan};
use crate::reconcile::journal::Journal;

/// Version of `meta.json` and `plan.json` written by this klab.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("lab `{lab}` is busy: another klab command holds {path}")]
    Locked { lab: String, path: PathBuf },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is damaged: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot generate a key for {what}: {message}")]
    KeyGen { what: String, message: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Facts about the lab recorded at `klab up`, readable without the lab file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabMeta {
    /// 0 for files written before state files were versioned.
    #[serde(default)]
    pub version: u32,
    pub lab: String,
    pub uri: String,
    /// Accelerator actually used (`kvm` or `qemu`).
    pub accel: String,
    /// Absolute path of the lab file last used with `up`.
    pub source: Option<String>,
    #[serde(default)]
    pub klab_version: String,
}

/// `plan.json`: the plan with the file's version next to its fields.
#[derive(Serialize, Deserialize)]
struct PlanFile {
    #[serde(default)]
    version: u32,
    #[serde(flatten)]
    plan: LabPlan,
}

/// What `down` and `status` need from a `plan.json` of any klab version (or a partly damaged
/// one): object names only, every field optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default)]
pub struct DownFacts {
    pub version: u32,
    pub pool: Option<DownPool>,
    pub nodes: Vec<DownNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default)]
pub struct DownPool {
    pub name: String,
    pub owned: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default)]
pub struct DownNode {
    pub name: String,
    pub domain: String,
    pub overlay: Option<NamedFile>,
    pub seed: Option<NamedFile>,
    pub console_log: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default)]
pub struct NamedFile {
    pub name: String,
}

impl From<&LabPlan> for DownFacts {
    fn from(p: &LabPlan) -> Self {
        Self {
            version: STATE_VERSION,
            pool: Some(DownPool {
                name: p.pool.name.clone(),
                owned: Some(true),
            }),
            nodes: p
                .nodes
                .iter()
                .map(|n| DownNode {
                    name: n.name.clone(),
                    domain: n.domain.clone(),
                    overlay: Some(NamedFile {
                        name: n.overlay.name.clone(),
                    }),
                    seed: Some(NamedFile {
                        name: n.seed.name.clone(),
                    }),
                    console_log: Some(n.console_log.clone()),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    lab: String,
    dir: PathBuf,
}

/// Held while a command works on a lab; released on drop (also when the process dies).
#[derive(Debug)]
pub struct LabLock {
    _file: File,
}

impl StateDir {
    pub fn new(root: &Path, lab: &str) -> Self {
        Self {
            lab: lab.to_string(),
            dir: root.join(lab),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn lab(&self) -> &str {
        &self.lab
    }

    pub fn exists(&self) -> bool {
        self.dir.join("meta.json").exists() || self.dir.join("plan.json").exists()
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        fs::create_dir_all(self.dir.join("hostkeys")).map_err(io("cannot create", &self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(io("cannot set permissions on", &self.dir))
    }

    /// Take the lab's lock without waiting; a second command gets `StateError::Locked`.
    pub fn lock(&self) -> Result<LabLock, StateError> {
        self.ensure_dir()?;
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(LabLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(StateError::Locked {
                lab: self.lab.clone(),
                path,
            }),
            Err(fs::TryLockError::Error(e)) => Err(io("cannot lock", &path)(e)),
        }
    }

    /// Keys for every node in `nodes`, generating (and saving, 0600) the ones that do not exist yet.
    /// `generate(comment)` returns `(private OpenSSH PEM, public line)`.
    pub fn ensure_keys<E: std::fmt::Display>(
        &self,
        nodes: &[String],
        mut generate: impl FnMut(&str) -> Result<(String, String), E>,
    ) -> Result<KeyMaterial, StateError> {
        self.ensure_dir()?;
        let user = self.ensure_keypair(
            &self.dir.join("id_ed25519"),
            &format!("klab@{}", self.lab),
            &mut generate,
        )?;
        let mut host_keys = Vec::with_capacity(nodes.len());
        for node in nodes {
            let (private, public) = self.ensure_keypair(
                &self.dir.join("hostkeys").join(node),
                &format!("root@{node}"),
                &mut generate,
            )?;
            host_keys.push((
                node.clone(),
                HostKey {
                    private_openssh: private,
                    public_openssh: strip_comment(&public),
                },
            ));
        }
        Ok(KeyMaterial {
            user_public_key: user.1.trim().to_string(),
            host_keys,
        })
    }

    fn ensure_keypair<E: std::fmt::Display>(
        &self,
        path: &Path,
        comment: &str,
        generate: &mut impl FnMut(&str) -> Result<(String, String), E>,
    ) -> Result<(String, String), StateError> {
        let pub_path = path.with_extension("pub");
        if path.exists() && pub_path.exists() {
            let private = fs::read_to_string(path).map_err(io("cannot read", path))?;
            let public = fs::read_to_string(&pub_path).map_err(io("cannot read", &pub_path))?;
            return Ok((private, public.trim().to_string()));
        }
        let (private, public) = generate(comment).map_err(|e| StateError::KeyGen {
            what: comment.to_string(),
            message: e.to_string(),
        })?;
        write_private(path, private.as_bytes())?;
        write_private(&pub_path, format!("{}\n", public.trim()).as_bytes())?;
        Ok((private, public.trim().to_string()))
    }

    /// `node`'s pinned host key as an OpenSSH public key (`type base64`, no comment); `None` when
    /// the lab never had that node.
    pub fn pinned_host_key(&self, node: &str) -> Option<String> {
        let line =
            fs::read_to_string(self.dir.join("hostkeys").join(format!("{node}.pub"))).ok()?;
        let key: Vec<&str> = line.split_whitespace().take(2).collect();
        (key.len() == 2).then(|| key.join(" "))
    }

    /// The lab user's private key (for SSH).
    pub fn user_private_key(&self) -> Result<String, StateError> {
        let p = self.dir.join("id_ed25519");
        fs::read_to_string(&p).map_err(io("cannot read", &p))
    }

    pub fn user_key_path(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    pub fn known_hosts_path(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    pub fn ssh_config_path(&self) -> PathBuf {
        self.dir.join("ssh_config")
    }

    pub fn save_plan(&self, plan: &LabPlan) -> Result<(), StateError> {
        self.ensure_dir()?;
        let file = PlanFile {
            version: STATE_VERSION,
            plan: plan.clone(),
        };
        let json = serde_json::to_string_pretty(&file).map_err(|e| StateError::Corrupt {
            path: self.dir.join("plan.json"),
            message: e.to_string(),
        })?;
        write_private(&self.dir.join("plan.json"), json.as_bytes())
    }

    /// The plan saved by the last `up` (what `down`, `status` and `ssh` work from without the lab
    /// file). A file that no longer parses is `StateError::Corrupt`.
    pub fn load_plan(&self) -> Result<Option<LabPlan>, StateError> {
        Ok(self.load_json::<PlanFile>("plan.json")?.map(|f| f.plan))
    }

    /// The object names of `plan.json`, from any klab version; `None` when there is no file or
    /// it is not JSON at all.
    pub fn load_down_facts(&self) -> Option<DownFacts> {
        self.load_json("plan.json").ok().flatten()
    }

    pub fn load_journal(&self) -> Result<Option<Journal>, StateError> {
        self.load_json("journal.json")
    }

    /// Written atomically (temp file + rename), so a crash leaves the old or the new journal.
    pub fn save_journal(&self, journal: &Journal) -> Result<(), StateError> {
        self.ensure_dir()?;
        let json = serde_json::to_string_pretty(journal).map_err(|e| StateError::Corrupt {
            path: self.dir.join("journal.json"),
            message: e.to_string(),
        })?;
        write_private(&self.dir.join("journal.json"), json.as_bytes())
    }

    /// Forget the journal (the lab's objects are gone; keys and plan may stay).
    pub fn remove_journal(&self) -> Result<(), StateError> {
        let p = self.dir.join("journal.json");
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &p)(e)),
        }
    }

    /// True when another command holds the lab's lock (creates nothing).
    pub fn is_locked(&self) -> bool {
        let Ok(file) = File::open(self.dir.join("lock")) else {
            return false;
        };
        matches!(file.try_lock(), Err(fs::TryLockError::WouldBlock))
    }

    /// Remove the state directory when it records no lab (no `meta.json`): what a command that
    /// failed before creating anything leaves.
    pub fn remove_if_unused(&self) -> Result<(), StateError> {
        if self.dir.join("meta.json").exists() {
            return Ok(());
        }
        self.remove()
    }

    pub fn save_meta(&self, meta: &LabMeta) -> Result<(), StateError> {
        self.ensure_dir()?;
        let json = serde_json::to_string_pretty(meta).unwrap_or_default();
        write_private(&self.dir.join("meta.json"), json.as_bytes())
    }

    pub fn load_meta(&self) -> Result<Option<LabMeta>, StateError> {
        self.load_json("meta.json")
    }

    fn load_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        let p = self.dir.join(name);
        if !p.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&p).map_err(io("cannot read", &p))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path: p,
                message: e.to_string(),
            })
    }

    pub fn write_file(&self, name: &str, content: &str) -> Result<PathBuf, StateError> {
        self.ensure_dir()?;
        let p = self.dir.join(name);
        write_private(&p, content.as_bytes())?;
        Ok(p)
    }

    /// Write `rel` (a path under the state directory, e.g. `cluster/ca.key`) owner-only: the
    /// file 0600, any directory it needs 0700.
    pub fn write_private_file(&self, rel: &str, content: &[u8]) -> Result<PathBuf, StateError> {
        self.ensure_dir()?;
        let p = self.dir.join(rel);
        if let Some(parent) = p.parent()
            && parent != self.dir
        {
            fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o700))
                .map_err(io("cannot set permissions on", parent))?;
        }
        write_private(&p, content)?;
        Ok(p)
    }

    /// `rel` under the state directory; `None` when it does not exist.
    pub fn read_file(&self, rel: &str) -> Result<Option<String>, StateError> {
        let p = self.dir.join(rel);
        match fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("cannot read", &p)(e)),
        }
    }

    /// Remove the whole state directory. Absent = fine.
    pub fn remove(&self) -> Result<(), StateError> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &self.dir)(e)),
        }
    }
}

/// Labs that have a state directory under `root`, sorted.
pub fn list_labs(root: &Path) -> Result<Vec<String>, StateError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("cannot read", root)(e)),
    };
    let mut labs: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| StateDir::new(root, name).exists())
        .collect();
    labs.sort();
    Ok(labs)
}

fn strip_comment(public: &str) -> String {
    let mut parts = public.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(kind), Some(data)) => format!("{kind} {data}"),
        _ => public.trim().to_string(),
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp-write");
    {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("cannot write", &tmp))?;
        f.write_all(data).map_err(io("cannot write", &tmp))?;
        f.sync_all().map_err(io("cannot write", &tmp))?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .map_err(io("cannot set permissions on", &tmp))?;
    fs::rename(&tmp, path).map_err(io("cannot write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_gen(counter: &mut u32) -> impl FnMut(&str) -> Result<(String, String), String> + '_ {
        move |comment| {
            *counter += 1;
            Ok((
                format!("PRIVATE-{counter}"),
                format!("ssh-ed25519 KEY{counter} {comment}"),
            ))
        }
    }

    #[test]
    fn keys_are_generated_once_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let st = StateDir::new(tmp.path(), "demo");
        let nodes = vec!["cp1".to_string(), "w1".to_string()];
        let mut n = 0;
        let k1 = st.ensure_keys(&nodes, fake_gen(&mut n)).unwrap();
        assert_eq!(n, 3);
        assert_eq!(k1.user_public_key, "ssh-ed25519 KEY1 klab@demo");
        assert_eq!(k1.host_keys[1].1.public_openssh, "ssh-ed25519 KEY3");
        let mode = fs::metadata(st.path().join("hostkeys/cp1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second call reuses what is on disk; a new node gets a new key only.
        let mut m = 10;
        let nodes2 = vec!["cp1".to_string(), "w1".to_string(), "w2".to_string()];
        let k2 = st.ensure_keys(&nodes2, fake_gen(&mut m)).unwrap();
        assert_eq!(m, 11);
        assert_eq!(k2.host_keys[0], k1.host_keys[0]);
        assert_eq!(k2.host_keys[2].1.public_openssh, "ssh-ed25519 KEY11");
    }

    #[test]
    fn second_lock_is_refused_with_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let st = StateDir::new(tmp.path(), "demo");
        let _held = st.lock().unwrap();
        let err = st.lock().unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }));
        assert!(err.to_string().contains("lab `demo` is busy"));
        drop(_held);
        st.lock().unwrap();
    }

    #[test]
    fn a_saved_plan_reads_back_identical_and_a_damaged_one_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let st = StateDir::new(tmp.path(), "ha");
        assert_eq!(st.load_plan().unwrap(), None);
        let lab = crate::plan::fixtures::ha_lab();
        let plan = crate::plan::plan(&lab, &crate::plan::fixtures::inputs(&lab.name));
        st.save_plan(&plan).unwrap();
        assert_eq!(st.load_plan().unwrap(), Some(plan));
        fs::write(st.path().join("plan.json"), "{").unwrap();
        assert!(matches!(st.load_plan(), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn state_files_of_an_older_klab_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        let st = StateDir::new(tmp.path(), "old");
        fs::create_dir_all(st.path()).unwrap();
        // meta.json and plan.json as klab 0.1 wrote them: no version, a plan with fields this
        // klab no longer knows and without some it has.
        fs::write(
            st.path().join("meta.json"),
            r#"{"lab":"old","uri":"qemu:///system","accel":"qemu","source":null}"#,
        )
        .unwrap();
        fs::write(
            st.path().join("plan.json"),
            r#"{"lab":"old","prefix":"klab-old","pool":{"name":"klab-old","path":"/p","owned":true,"shared_with":[]},
               "nodes":[{"name":"cp1","domain":"klab-old-cp1","overlay":{"name":"cp1.qcow2","path":"/p/cp1.qcow2"},
                         "seed":{"name":"cp1-seed.img"},"console_log":"/c/klab-old-cp1.log","flavor":"big"}]}"#,
        )
        .unwrap();
        let meta = st.load_meta().unwrap().unwrap();
        assert_eq!(meta.version, 0);
        assert_eq!(meta.uri, "qemu:///system");
        assert!(matches!(st.load_plan(), Err(StateError::Corrupt { .. })));
        let facts = st.load_down_facts().unwrap();
        assert_eq!(facts.version, 0);
        assert_eq!(facts.pool.unwrap().name, "klab-old");
        assert_eq!(facts.nodes[0].domain, "klab-old-cp1");
        assert_eq!(facts.nodes[0].seed.as_ref().unwrap().name, "cp1-seed.img");
        assert_eq!(
            facts.nodes[0].console_log.as_deref(),
            Some("/c/klab-old-cp1.log")
        );
        fs::write(st.path().join("plan.json"), "{").unwrap();
        assert_eq!(st.load_down_facts(), None);
    }

    #[test]
    fn a_saved_plan_carries_its_version_and_the_journal_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let st = StateDir::new(tmp.path(), "ha");
        let lab = crate::plan::fixtures::ha_lab();
        let plan = crate::plan::plan(&lab, &crate::plan::fixtures::inputs(&lab.name));
        st.save_plan(&plan).unwrap();
        let text = fs::read_to_string(st.path().join("plan.json")).unwrap();
        assert!(text.starts_with("{\n  \"version\": 1,"), "{text}");
        assert_eq!(st.load_down_facts().unwrap().version, 1);
        let mut j = Journal::new("ha");
        j.reach("cp1", crate::reconcile::journal::Step::Ssh, "aa");
        st.save_journal(&j).unwrap();
        assert_eq!(st.load_journal().unwrap(), Some(j));
    }

    #[test]
    fn a_state_dir_without_meta_is_removed_and_one_with_meta_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let st = StateDir::new(tmp.path(), "x");
        let lock = st.lock().unwrap();
        assert!(st.is_locked());
        drop(lock);
        assert!(!st.is_locked());
        st.remove_if_unused().unwrap();
        assert!(!st.path().exists());
        st.write_file("meta.json", "{}").unwrap();
        st.remove_if_unused().unwrap();
        assert!(st.path().exists());
    }

    #[test]
    fn list_labs_finds_only_real_state_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        StateDir::new(tmp.path(), "b")
            .save_meta(&LabMeta {
                version: STATE_VERSION,
                lab: "b".into(),
                uri: "test:///default".into(),
                accel: "qemu".into(),
                source: None,
                klab_version: "0".into(),
            })
            .unwrap();
        fs::create_dir_all(tmp.path().join("a-not-a-lab")).unwrap();
        assert_eq!(list_labs(tmp.path()).unwrap(), vec!["b".to_string()]);
        assert!(list_labs(&tmp.path().join("missing")).unwrap().is_empty());
    }
}
