//! Base images: the local cache (`<root>/<key>.qcow2` + `<key>.json`), verified downloads of catalog and
//! URL images, checks on local `path` images, and the local Debian build (`klab image build debian-12`).
//!
//! Everything here does blocking I/O; async callers run it in `spawn_blocking`.

mod build;
pub mod checksum;
mod command;
pub(crate) mod download;
mod progress;

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::catalog;
use crate::plan::{ImageSpec, LocalImage};

pub use build::{BuildOptions, BuiltImage, DEBIAN12_CMDLINE, build_debian12};
pub use checksum::ChecksumKind;
pub use download::Source;
pub use progress::{BarProgress, NoProgress, Progress};

/// Default cache location when `KLAB_DATA_DIR` is not set.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/klab";

/// The first four bytes of every qcow2 file.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Images the local builder can make.
pub const BUILDABLE: &[&str] = &["debian-12"];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image `{key}`: {} does not exist", path.display())]
    Missing { key: String, path: PathBuf },
    #[error("image `{key}`: cannot read {}", path.display())]
    Read {
        key: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image `{key}`: {} is {found}, not qcow2\n  hint: {hint}", path.display())]
    NotQcow2 {
        key: String,
        path: PathBuf,
        found: String,
        hint: String,
    },
    #[error("cannot download image `{key}` from {url}: {reason}\n  hint: {hint}")]
    Download {
        key: String,
        url: String,
        reason: String,
        hint: String,
    },
    #[error(
        "image `{key}`: checksum mismatch for {url}: expected {kind} {expected}, got {actual} (download discarded)"
    )]
    ChecksumMismatch {
        key: String,
        url: String,
        kind: &'static str,
        expected: String,
        actual: String,
    },
    #[error("image `{key}`: {checksum_url} lists no {kind} checksum for `{file}`")]
    ChecksumNotListed {
        key: String,
        checksum_url: String,
        file: String,
        kind: &'static str,
    },
    #[error(
        "image `{key}`: no checksum to verify {url} against\n  hint: set `sha256 = \"…\"` in [images.{key}]"
    )]
    NoChecksum { key: String, url: String },
    #[error("image `{key}`: `{value}` is not a sha256 digest (64 hex characters)")]
    BadDigest { key: String, value: String },
    #[error("image cache: cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image `{key}`: cannot parse metadata {}", path.display())]
    Meta {
        key: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("`klab image build` must run as root (debootstrap, chroot and mkfs.ext4 -d need it)")]
    NotRoot,
    #[error("image `{key}`: `klab image build` can only build {}", BUILDABLE.join(", "))]
    NotBuildable { key: String },
    #[error("`{tool}` not found in PATH\n  hint: install it: apt-get install {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("image `{key}`: cannot run `{step}`")]
    Spawn {
        key: String,
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("image `{key}`: `{step}` failed ({status}); last output:\n{tail}")]
    Command {
        key: String,
        step: String,
        status: String,
        tail: String,
    },
    #[error(
        "image `{key}`: `{step}` did not finish within {bound} and was killed\n  hint: a slow Debian mirror or disk can do this; check the host (load, disk, `KLAB_DEBIAN_MIRROR`) and run `klab image build` again"
    )]
    Timeout {
        key: String,
        step: String,
        bound: String,
    },
    #[error(
        "image `{key}`: {} does not match what the lab asks for ({reason}), and overlays still use it as their base: {}\n  hint: `klab down` the labs using it first, or give the new image its own key in [images.<key>]",
        path.display(),
        users.join(", ")
    )]
    InUse {
        key: String,
        path: PathBuf,
        reason: String,
        users: Vec<String>,
    },
    #[error(
        "image `{key}`: another klab still holds {} after {waited}\n  hint: another `klab up` or `klab image build` is downloading or building this image; wait for it or stop it",
        path.display()
    )]
    Locked {
        key: String,
        path: PathBuf,
        waited: String,
    },
    #[error("image `{key}`: {} changed on disk after its download was verified: expected {kind} {expected}, found {actual} (removed)", path.display())]
    ChangedOnDisk {
        key: String,
        path: PathBuf,
        kind: &'static str,
        expected: String,
        actual: String,
    },
    #[error("image `{key}`: {what}")]
    Build { key: String, what: String },
}

/// Where an image in the cache came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Downloaded and verified against a published or configured checksum.
    Download,
    /// Made by `klab image build`.
    Built,
}

/// `<key>.json` next to `<key>.qcow2`: what the file is and how it was verified. Size and mtime tell
/// whether the record still describes the file; reuse also hashes it against `checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub key: String,
    pub source: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `sha256` or `sha512`.
    pub checksum_kind: String,
    pub checksum: String,
    pub size: u64,
    pub mtime_secs: u64,
    pub mtime_nanos: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// `klab <version>`.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Build details (mirror, suite, packages) for built images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<serde_json::Value>,
}

impl ImageMeta {
    /// `true` when `path` still is the file this metadata describes (same size and mtime).
    fn matches_file(&self, path: &Path) -> bool {
        match file_stamp(path) {
            Ok((size, secs, nanos)) => {
                size == self.size && secs == self.mtime_secs && nanos == self.mtime_nanos
            }
            Err(_) => false,
        }
    }
}

/// How long a second klab waits for the image another one is downloading or building: longer than
/// the download's own bound (one hour for the body) and than a build.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(2 * 3600);

/// The image cache directory.
///
/// Safe for several klab processes at once: every change to `<key>.*` happens under the per-image lock
/// `.locks/<key>.lock`, downloads go to a `.part` file unique to the process, what ends up on disk is
/// hashed again after the rename, and an image that overlays in the pools next to the cache
/// (`<root>/../pools/*/*.qcow2`) use as their base is never replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCache {
    root: PathBuf,
    overlay_root: PathBuf,
    lock_wait: Duration,
}

/// Holds the per-image lock until dropped (closing the file releases it).
#[derive(Debug)]
pub struct ImageLock {
    _file: fs::File,
}

/// What the cache holds for a key, compared with what a lab asks for.
enum Cached {
    Usable(PathBuf),
    Absent,
    /// A file is there but it is not the one asked for (why, in words).
    Stale(String),
}

impl ImageCache {
    /// A cache at `root`; overlays are looked for in `<root>/../pools` (the `KLAB_DATA_DIR` layout).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let overlay_root = root
            .parent()
            .map(|p| p.join("pools"))
            .unwrap_or_else(|| PathBuf::from("pools"));
        Self {
            root,
            overlay_root,
            lock_wait: DEFAULT_LOCK_WAIT,
        }
    }

    /// Where the per-lab pool directories (`<dir>/<lab>/*.qcow2`) are.
    pub fn with_overlay_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.overlay_root = dir.into();
        self
    }

    /// How long [`ImageCache::lock`] waits for another holder.
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// `$KLAB_DATA_DIR/images`, else `/var/lib/klab/images`.
    pub fn from_env() -> Self {
        let data = std::env::var_os("KLAB_DATA_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        Self::new(data.join("images"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<key>.qcow2`: the same path the planner computes for cached images.
    pub fn base_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.qcow2"))
    }

    pub fn meta_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.json"))
    }

    pub fn kernel_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.vmlinuz"))
    }

    pub fn initrd_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.initrd"))
    }

    /// Persistent debootstrap package cache, so rebuilds download nothing.
    pub fn debootstrap_cache(&self) -> PathBuf {
        self.root.join(".debootstrap-cache")
    }

    /// Creates the cache directory (0755: qemu runs as `libvirt-qemu` and must traverse it).
    pub fn create_root(&self) -> Result<(), ImageError> {
        let write_err = |source| ImageError::Write {
            path: self.root.clone(),
            source,
        };
        fs::create_dir_all(&self.root).map_err(write_err)?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o755)).map_err(write_err)
    }

    pub fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join(".locks").join(format!("{key}.lock"))
    }

    /// Takes the lock of image `key`, waiting at most the cache's lock wait for another holder.
    pub fn lock(&self, key: &str) -> Result<ImageLock, ImageError> {
        self.create_root()?;
        let path = self.lock_path(key);
        let write_err = |source| ImageError::Write {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(write_err)?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(write_err)?;
        let started = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(ImageLock { _file: file }),
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(source)) => return Err(write_err(source)),
            }
            if started.elapsed() >= self.lock_wait {
                return Err(ImageError::Locked {
                    key: key.to_string(),
                    path,
                    waited: format!("{:.1} s", started.elapsed().as_secs_f64()),
                });
            }
            if !told {
                tracing::info!("image `{key}`: waiting for another klab to finish with it");
                told = true;
            }
            std::thread::sleep(Duration::from_millis(50).min(self.lock_wait));
        }
    }

    /// Overlays in the pool directories whose qcow2 backing file is `base`.
    pub fn overlays_using(&self, base: &Path) -> Vec<PathBuf> {
        let want = fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        let mut users = Vec::new();
        let Ok(pools) = fs::read_dir(&self.overlay_root) else {
            return users;
        };
        let mut dirs: Vec<PathBuf> = pools.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
                .collect();
            files.sort();
            for file in files {
                let Some(backing) = qcow2_backing_file(&file) else {
                    continue;
                };
                let backing = dir.join(backing);
                let backing = fs::canonicalize(&backing).unwrap_or(backing);
                if backing == want {
                    users.push(file);
                }
            }
        }
        users
    }

    /// Metadata of a cached image; `None` when there is none.
    pub fn meta(&self, key: &str) -> Result<Option<ImageMeta>, ImageError> {
        let path = self.meta_path(key);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ImageError::Read {
                    key: key.to_string(),
                    path,
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| ImageError::Meta {
                key: key.to_string(),
                path,
                source,
            })
    }

    /// Writes `<key>.json` atomically (0644).
    pub(crate) fn write_meta(&self, meta: &ImageMeta) -> Result<(), ImageError> {
        let path = self.meta_path(&meta.key);
        let text = serde_json::to_string_pretty(meta).map_err(|e| ImageError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomic(&path, format!("{text}\n").as_bytes())
    }

    /// Images `klab image build` made, as the planner wants them. Unreadable metadata is skipped with a
    /// warning rather than failing every command that plans a lab.
    pub fn local_images(&self) -> Result<Vec<LocalImage>, ImageError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ImageError::Read {
                    key: "*".into(),
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut keys: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".json").map(str::to_string)
            })
            .collect();
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let meta = match self.meta(&key) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("skipping cached image `{key}`: {e}");
                    continue;
                }
            };
            let path = self.base_path(&key);
            if meta.source != Origin::Built || meta.key != key || !path.is_file() {
                continue;
            }
            out.push(LocalImage {
                key,
                path: path.display().to_string(),
                kernel: meta.kernel,
                initrd: meta.initrd,
                cmdline: meta.cmdline,
            });
        }
        Ok(out)
    }

    /// Makes sure the base image of `spec` is usable and returns its path: a `path` image is checked
    /// (exists, readable, qcow2); a URL or catalog image is taken from the cache when its recorded
    /// checksum still matches, otherwise downloaded and verified. A locally built image in the cache
    /// stands in for the download.
    pub fn ensure(&self, spec: &ImageSpec, progress: &dyn Progress) -> Result<PathBuf, ImageError> {
        if spec.url.is_some() && Path::new(&spec.base_path) != self.base_path(&spec.key) {
            tracing::warn!(
                "image `{}`: the plan expects {} but the cache is {}",
                spec.key,
                spec.base_path,
                self.root.display()
            );
        }
        let Some(url) = &spec.url else {
            let path = PathBuf::from(&spec.base_path);
            check_qcow2(&spec.key, &path)?;
            return Ok(path);
        };
        let source = match &spec.sha256 {
            Some(digest) => Source::Digest {
                url: url.clone(),
                kind: ChecksumKind::Sha256,
                hex: normalize_sha256(&spec.key, digest)?,
            },
            None => match catalog::lookup(&spec.key).filter(|c| c.url == url.as_str()) {
                Some(c) => Source::ChecksumFile {
                    url: url.clone(),
                    checksum_url: c.checksum_url.to_string(),
                    kind: c.checksum_kind,
                },
                None => {
                    return Err(ImageError::NoChecksum {
                        key: spec.key.clone(),
                        url: url.clone(),
                    });
                }
            },
        };
        self.fetch(&spec.key, &source, progress)
    }

    /// What the cache holds for `key`, judged against `source`. A file is reused only after its bytes
    /// on disk hash to the recorded digest (about a second per GiB); a file without a matching record
    /// is hashed when the lab gives the expected digest.
    fn cached(&self, key: &str, source: &Source) -> Result<Cached, ImageError> {
        let path = self.base_path(key);
        if !path.is_file() {
            return Ok(Cached::Absent);
        }
        let meta = self.meta(key)?;
        if let Some(meta) = &meta
            && meta.matches_file(&path)
        {
            let verdict = match meta.source {
                Origin::Built => None,
                Origin::Download if meta.url.as_deref() != Some(source.url()) => Some(format!(
                    "it was downloaded from {}, the lab names {}",
                    meta.url.as_deref().unwrap_or("?"),
                    source.url()
                )),
                // A published "latest" checksum can move on; the verified copy stays valid.
                Origin::Download => match source {
                    Source::ChecksumFile { .. } => None,
                    Source::Digest { kind, hex, .. }
                        if meta.checksum_kind == kind.as_str() && meta.checksum == *hex =>
                    {
                        None
                    }
                    Source::Digest { kind, hex, .. } => Some(format!(
                        "it has {} {}, the lab asks for {} {hex}",
                        meta.checksum_kind,
                        meta.checksum,
                        kind.as_str()
                    )),
                },
            };
            if let Some(why) = verdict {
                return Ok(Cached::Stale(why));
            }
            // The right file by its record; make sure the bytes on disk still are what was verified.
            let kind = ChecksumKind::from_name(&meta.checksum_kind).unwrap_or(ChecksumKind::Sha256);
            let actual = hash_file(key, &path, kind)?;
            if actual != meta.checksum {
                return Ok(Cached::Stale(format!(
                    "its {} is {actual}, not the {} recorded when it was verified",
                    kind.as_str(),
                    meta.checksum
                )));
            }
            tracing::debug!("image `{key}`: using cached {} (verified)", path.display());
            return Ok(Cached::Usable(path));
        }
        // A file placed by hand (or changed since it was verified) with a known digest: hash it.
        if let Source::Digest { url, kind, hex } = source {
            let actual = hash_file(key, &path, *kind)?;
            if actual == *hex {
                self.write_meta(&download_meta(key, url, *kind, hex, &path)?)?;
                return Ok(Cached::Usable(path));
            }
            return Ok(Cached::Stale(format!(
                "its {} is {actual}, the lab asks for {hex}",
                kind.as_str()
            )));
        }
        Ok(Cached::Stale(if meta.is_some() {
            "it changed since it was verified".into()
        } else {
            "nothing records where it came from".into()
        }))
    }

    /// Returns the verified cached copy of `source` under `key`, downloading it when needed. Holds
    /// the image's lock throughout; refuses to replace a file that overlays use.
    pub fn fetch(
        &self,
        key: &str,
        source: &Source,
        progress: &dyn Progress,
    ) -> Result<PathBuf, ImageError> {
        let _lock = self.lock(key)?;
        match self.cached(key, source)? {
            Cached::Usable(path) => return Ok(path),
            Cached::Absent => {}
            Cached::Stale(reason) => {
                let path = self.base_path(key);
                self.refuse_if_in_use(key, &path, &reason)?;
                tracing::info!("image `{key}`: replacing {} ({reason})", path.display());
            }
        }
        download::download(self, key, source, progress)
    }

    /// [`ImageError::InUse`] when overlays use `path` as their base.
    pub(crate) fn refuse_if_in_use(
        &self,
        key: &str,
        path: &Path,
        reason: &str,
    ) -> Result<(), ImageError> {
        let users = self.overlays_using(path);
        if users.is_empty() {
            return Ok(());
        }
        Err(ImageError::InUse {
            key: key.to_string(),
            path: path.to_path_buf(),
            reason: reason.to_string(),
            users: users.iter().map(|u| u.display().to_string()).collect(),
        })
    }
}

/// The backing file name recorded in a qcow2 header (`None`: not qcow2, or no backing file).
pub fn qcow2_backing_file(path: &Path) -> Option<PathBuf> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::ffi::OsStringExt;
    let mut file = fs::File::open(path).ok()?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header).ok()?;
    if &header[..4] != QCOW2_MAGIC {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(header[16..20].try_into().ok()?);
    // The qcow2 spec caps the name at 1023 bytes.
    if offset == 0 || len == 0 || len > 1023 {
        return None;
    }
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; len as usize];
    file.read_exact(&mut name).ok()?;
    Some(PathBuf::from(std::ffi::OsString::from_vec(name)))
}

/// Accepts `abc…`, `ABC…` and `sha256:abc…`.
fn normalize_sha256(key: &str, value: &str) -> Result<String, ImageError> {
    let hex = value.trim();
    let hex = hex.strip_prefix("sha256:").unwrap_or(hex);
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(ImageError::BadDigest {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

fn file_stamp(path: &Path) -> io::Result<(u64, u64, u32)> {
    let md = fs::metadata(path)?;
    let mtime = md
        .modified()?
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ok((md.len(), mtime.as_secs(), mtime.subsec_nanos()))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn created_by() -> String {
    format!("klab {}", env!("CARGO_PKG_VERSION"))
}

fn download_meta(
    key: &str,
    url: &str,
    kind: ChecksumKind,
    hex: &str,
    path: &Path,
) -> Result<ImageMeta, ImageError> {
    let (size, mtime_secs, mtime_nanos) = file_stamp(path).map_err(|source| ImageError::Read {
        key: key.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ImageMeta {
        key: key.to_string(),
        source: Origin::Download,
        url: Some(url.to_string()),
        checksum_kind: kind.as_str().to_string(),
        checksum: hex.to_string(),
        size,
        mtime_secs,
        mtime_nanos,
        kernel: None,
        initrd: None,
        cmdline: None,
        created_by: created_by(),
        created_at: now_unix(),
        build: None,
    })
}

/// Hashes a whole file as it is on disk.
pub fn hash_file(key: &str, path: &Path, kind: ChecksumKind) -> Result<String, ImageError> {
    let read_err = |source| ImageError::Read {
        key: key.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(read_err)?;
    let mut hasher = checksum::Hasher::new(kind);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish_hex())
}

/// Writes `bytes` to `path` through a `.part` file and a rename, mode 0644.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let part = unique_part_path(path);
    let write_err = |source| ImageError::Write {
        path: path.to_path_buf(),
        source,
    };
    fs::write(&part, bytes).map_err(write_err)?;
    fs::set_permissions(&part, fs::Permissions::from_mode(0o644)).map_err(write_err)?;
    fs::rename(&part, path).map_err(write_err)
}

pub(crate) fn part_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// `<path>.part-<pid>-<n>`: no two writers, in this process or another, share a partial file.
pub(crate) fn unique_part_path(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut s = part_path(path).into_os_string();
    s.push(format!(
        "-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    PathBuf::from(s)
}

/// Removes `<path>.part*` left by a klab that died mid-write. Call only under the image's lock.
pub(crate) fn remove_stale_parts(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let mut prefix = name.to_owned();
    prefix.push(".part");
    let prefix = prefix.to_string_lossy().into_owned();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            tracing::debug!("removing stale {}", entry.path().display());
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// What the first bytes of a disk image say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    /// Raw disk with an MBR/GPT boot signature.
    RawPartitioned,
    /// Raw ext2/3/4 filesystem without a partition table.
    RawExt,
    Iso,
    Vmdk,
    Vhdx,
    Unknown,
}

impl DiskFormat {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Qcow2 => "a qcow2 image",
            Self::RawPartitioned => "a raw disk image",
            Self::RawExt => "a raw ext4 filesystem image",
            Self::Iso => "an ISO 9660 image",
            Self::Vmdk => "a VMDK image",
            Self::Vhdx => "a VHDX image",
            Self::Unknown => "not a recognised disk image",
        }
    }
}

/// Classifies a disk image by its header (pass at least the first 64 KiB when available).
pub fn sniff_format(head: &[u8]) -> DiskFormat {
    if head.starts_with(QCOW2_MAGIC) {
        DiskFormat::Qcow2
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        DiskFormat::Vmdk
    } else if head.starts_with(b"vhdxfile") {
        DiskFormat::Vhdx
    } else if head.get(0x8001..0x8006) == Some(b"CD001") {
        DiskFormat::Iso
    } else if head.get(1080..1082) == Some(&[0x53, 0xEF]) {
        DiskFormat::RawExt
    } else if head.get(510..512) == Some(&[0x55, 0xAA]) {
        DiskFormat::RawPartitioned
    } else {
        DiskFormat::Unknown
    }
}

fn sniff_reader(file: &mut fs::File) -> io::Result<DiskFormat> {
    let mut head = Vec::with_capacity(0x8800);
    file.take(0x8800).read_to_end(&mut head)?;
    Ok(sniff_format(&head))
}

/// Classifies the file at `path` by its header.
pub fn sniff_file(path: &Path) -> io::Result<DiskFormat> {
    sniff_reader(&mut fs::File::open(path)?)
}

/// Checks that a local image exists, is readable and is qcow2 (the overlays need a qcow2 backing file).
pub fn check_qcow2(key: &str, path: &Path) -> Result<(), ImageError> {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::Missing {
                key: key.to_string(),
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(ImageError::Read {
                key: key.to_string(),
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let format = sniff_reader(&mut file).map_err(|source| ImageError::Read {
        key: key.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    if format == DiskFormat::Qcow2 {
        if let Ok(md) = file.metadata()
            && md.permissions().mode() & 0o004 == 0
        {
            tracing::warn!(
                "image `{key}`: {} is not world-readable; qemu:///system runs qemu as libvirt-qemu",
                path.display()
            );
        }
        return Ok(());
    }
    let p = path.display();
    let hint = match format {
        DiskFormat::RawPartitioned | DiskFormat::RawExt => {
            format!(
                "convert it: qemu-img convert -f raw -O qcow2 {p} {p}.qcow2 and set `path` to the result"
            )
        }
        DiskFormat::Vmdk | DiskFormat::Vhdx => {
            format!(
                "convert it: qemu-img convert -O qcow2 {p} {p}.qcow2 and set `path` to the result"
            )
        }
        DiskFormat::Iso => {
            "an installer ISO cannot back a VM disk; use a cloud image (qcow2)".into()
        }
        _ => "`path` must point at a qcow2 cloud image".into(),
    };
    Err(ImageError::NotQcow2 {
        key: key.to_string(),
        path: path.to_path_buf(),
        found: format.describe().to_string(),
        hint,
    })
}

/// The hint shown when a download fails: build locally when klab can, or point at a local file.
pub(crate) fn download_hint(key: &str) -> String {
    if BUILDABLE.contains(&key) {
        format!(
            "run `klab image build {key}` to build it locally from Debian packages, or set `path = …` in [images.{key}]"
        )
    } else {
        format!(
            "download it elsewhere and set `path = …` in [images.{key}], or use image \"debian-12\" after `klab image build debian-12`"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_formats() {
        assert_eq!(sniff_format(b"QFI\xfb\0\0\0\x03"), DiskFormat::Qcow2);
        let mut mbr = vec![0u8; 4096];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        assert_eq!(sniff_format(&mbr), DiskFormat::RawPartitioned);
        let mut ext = vec![0u8; 4096];
        ext[1080] = 0x53;
        ext[1081] = 0xEF;
        assert_eq!(sniff_format(&ext), DiskFormat::RawExt);
        let mut iso = vec![0u8; 0x8800];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(sniff_format(&iso), DiskFormat::Iso);
        assert_eq!(sniff_format(b"KDMV...."), DiskFormat::Vmdk);
        assert_eq!(sniff_format(b""), DiskFormat::Unknown);
    }

    #[test]
    fn sha256_values_are_normalized_or_rejected() {
        let hex = "AB".repeat(32);
        assert_eq!(normalize_sha256("k", &hex).unwrap(), "ab".repeat(32));
        assert_eq!(
            normalize_sha256("k", &format!("sha256:{}", "cd".repeat(32))).unwrap(),
            "cd".repeat(32)
        );
        let err = normalize_sha256("k", "abc").unwrap_err().to_string();
        assert!(err.contains("image `k`") && err.contains("`abc`"), "{err}");
    }

    #[test]
    fn paths_follow_the_planner_convention() {
        let c = ImageCache::new("/x/images");
        assert_eq!(
            c.base_path("debian-12"),
            Path::new("/x/images/debian-12.qcow2")
        );
        assert_eq!(
            c.meta_path("debian-12"),
            Path::new("/x/images/debian-12.json")
        );
        assert_eq!(c.kernel_path("a"), Path::new("/x/images/a.vmlinuz"));
        assert_eq!(c.initrd_path("a"), Path::new("/x/images/a.initrd"));
        assert_eq!(
            part_path(Path::new("/x/a.qcow2")),
            Path::new("/x/a.qcow2.part")
        );
    }

    #[test]
    fn download_hint_depends_on_buildability() {
        assert!(download_hint("debian-12").contains("klab image build debian-12"));
        assert!(download_hint("ubuntu-24.04").contains("[images.ubuntu-24.04]"));
    }
}
