//! The Calico manifest on the host: klab's catalog of pinned releases (URL + sha256), a verified,
//! locked download into the image cache (`<cache>/calico/<version>/calico.yaml`) with a progress
//! bar, and the lab's own file (`[kubernetes] calico-manifest`) for airgapped labs. Either way the
//! manifest must have the shape klab patches: the `calico-node` DaemonSet in `kube-system` with a
//! `calico-node` container and its `env` list. Nodes never fetch it themselves.
//!
//! Blocking I/O; async callers run [`ensure_manifest`] in `spawn_blocking`.

use crate::image::download::PartGuard;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::image::Progress;
use crate::plan::KubernetesSpec;

/// A Calico release klab knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalicoRelease {
    pub version: &'static str,
    /// sha256 of `manifests/calico.yaml` at the release tag. `None`: klab has not pinned it, so the
    /// download is refused unless the caller allows unpinned manifests (or the lab brings its own).
    pub sha256: Option<&'static str>,
}

/// Every release `calico-version` accepts (`plan::versions::CALICO_RELEASES`), newest first.
pub const RELEASES: &[CalicoRelease] = &[
    CalicoRelease {
        version: "3.32.1",
        // The digest other projects pin for this URL and verify before applying (several
        // independent repositories agree); klab could not download the file itself to check.
        sha256: Some("a1df919d9721cf667accdc3e72848911b0cb25cfab7d2478ad0c996302c95744"),
    },
    CalicoRelease {
        version: "3.31.7",
        // No published digest found: unverified until someone pins it from a trusted download.
        sha256: None,
    },
];

pub fn release(version: &str) -> Option<&'static CalicoRelease> {
    RELEASES.iter().find(|r| r.version == version)
}

/// The upstream manifest of a release.
pub fn manifest_url(version: &str) -> String {
    format!(
        "https://raw.githubusercontent.com/projectcalico/calico/v{version}/manifests/calico.yaml"
    )
}

/// The largest manifest klab reads (v3.32.1's is 349,572 bytes).
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
/// How long a second klab waits for another one's download of the same release.
const LOCK_WAIT: Duration = Duration::from_secs(600);

/// Where the manifest comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSpec {
    /// `3.32.1`: names the cache directory.
    pub version: String,
    /// The lab's own manifest (`calico-manifest`, already resolved against the lab file's
    /// directory): used as it is, no download and no digest.
    pub own: Option<PathBuf>,
    pub url: String,
    /// Lower-case hex; `None` = unpinned.
    pub sha256: Option<String>,
    /// Download an unpinned release anyway (`--allow-unpinned`).
    pub allow_unpinned: bool,
}

impl ManifestSpec {
    /// The lab's manifest: its own file, else the catalog entry of its `calico-version`.
    pub fn for_lab(k: &KubernetesSpec, allow_unpinned: bool) -> Self {
        let pinned = release(&k.calico_version).and_then(|r| r.sha256);
        Self {
            version: k.calico_version.clone(),
            own: k.calico_manifest.as_ref().map(PathBuf::from),
            url: manifest_url(&k.calico_version),
            sha256: pinned.map(str::to_string),
            allow_unpinned,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalicoError {
    #[error("Calico {version}: klab has no pinned sha256 for {url}, so it will not download it")]
    Unpinned { version: String, url: String },
    #[error("Calico {version}: `{version}` is not a release version")]
    BadVersion { version: String },
    #[error("Calico {version}: downloading {url} failed: {reason}")]
    Download {
        version: String,
        url: String,
        reason: String,
    },
    #[error(
        "Calico {version}: {url} has sha256 {actual}, but klab's catalog pins {expected}; nothing was kept"
    )]
    DigestMismatch {
        version: String,
        url: String,
        expected: String,
        actual: String,
    },
    #[error("Calico manifest {path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("Calico manifest {path}: {reason}")]
    Shape { path: PathBuf, reason: String },
    #[error("Calico manifest {path}: cannot read it")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Calico cache {path}: cannot write it")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Calico cache {path}: another klab holds the lock (waited {secs} s)")]
    Locked { path: PathBuf, secs: u64 },
}

impl CalicoError {
    /// What to do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Unpinned { .. } => Some(
                "set [kubernetes] calico-manifest = \"PATH\" to a calico.yaml you trust, use a pinned \
                 calico-version, or pass --allow-unpinned",
            ),
            Self::Download { .. } => Some(
                "the host must reach raw.githubusercontent.com; for airgapped labs set [kubernetes] \
                 calico-manifest = \"PATH\"",
            ),
            Self::DigestMismatch { .. } => Some(
                "the file upstream is not the one klab pinned: check the URL (a proxy or captive portal?) \
                 or bring the manifest yourself with calico-manifest",
            ),
            Self::Shape { .. } => Some(
                "klab patches the calico-node DaemonSet of the manifest-based install \
                 (manifests/calico.yaml), not the operator's tigera-operator.yaml",
            ),
            Self::Locked { .. } => Some("wait for the other klab to finish, then run this again"),
            _ => None,
        }
    }
}

/// The manifest to upload: the lab's own file, or the verified cached download (fetched when
/// missing or not matching its pin). `cache` is the image cache root (`paths::image_cache()`).
pub fn ensure_manifest(
    spec: &ManifestSpec,
    cache: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf, CalicoError> {
    if let Some(own) = &spec.own {
        let text = read_bounded(own)?;
        check_shape(own, &text)?;
        tracing::info!("Calico: using the lab's manifest {}", own.display());
        return Ok(own.clone());
    }
    let version_ok = !spec.version.is_empty()
        && spec
            .version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !version_ok || spec.version.starts_with('.') {
        return Err(CalicoError::BadVersion {
            version: spec.version.clone(),
        });
    }
    if spec.sha256.is_none() && !spec.allow_unpinned {
        return Err(CalicoError::Unpinned {
            version: spec.version.clone(),
            url: spec.url.clone(),
        });
    }
    let dir = cache.join("calico").join(&spec.version);
    fs::create_dir_all(&dir).map_err(|source| CalicoError::Write {
        path: dir.clone(),
        source,
    })?;
    let _lock = lock(&dir.join("lock"))?;
    let dest = dir.join("calico.yaml");

    if dest.is_file() {
        let text = read_bounded(&dest)?;
        match &spec.sha256 {
            Some(want) if sha256_hex(&text) == *want => {
                check_shape(&dest, &text)?;
                tracing::debug!("Calico {}: using cached {}", spec.version, dest.display());
                return Ok(dest);
            }
            Some(_) => {
                tracing::warn!(
                    "Calico {}: cached {} does not match the pinned sha256; downloading again",
                    spec.version,
                    dest.display()
                );
                fs::remove_file(&dest).map_err(|source| CalicoError::Write {
                    path: dest.clone(),
                    source,
                })?;
            }
            None => {
                tracing::warn!(
                    "Calico {}: using cached {} (unpinned: not verified)",
                    spec.version,
                    dest.display()
                );
                check_shape(&dest, &text)?;
                return Ok(dest);
            }
        }
    }
    download(spec, &dest, progress)?;
    Ok(dest)
}

fn agent() -> ureq::Agent {
    // A manifest is a few hundred KiB: ten minutes is generous.
    crate::image::download::agent_with_body_bound(Duration::from_secs(600))
}

fn download(spec: &ManifestSpec, dest: &Path, progress: &dyn Progress) -> Result<(), CalicoError> {
    let fail = |reason: String| CalicoError::Download {
        version: spec.version.clone(),
        url: spec.url.clone(),
        reason,
    };
    let part = dest.with_extension("yaml.part");
    let write_err = |source| CalicoError::Write {
        path: part.clone(),
        source,
    };
    tracing::info!("Calico {}: downloading {}", spec.version, spec.url);
    let response = agent()
        .get(&spec.url)
        .call()
        .map_err(|e| fail(e.to_string()))?;
    let total = response.body().content_length();
    if total.is_some_and(|t| t > MAX_MANIFEST_BYTES) {
        return Err(fail(format!(
            "the server announces {} bytes, more than {MAX_MANIFEST_BYTES}",
            total.unwrap_or_default()
        )));
    }
    let mut reader = response.into_body().into_reader();
    let mut file = fs::File::create(&part).map_err(write_err)?;
    let mut guard = PartGuard {
        path: &part,
        armed: true,
    };
    progress.begin(&format!("downloading Calico {}", spec.version), total);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got: u64 = 0;
    let copied: Result<(), CalicoError> = (|| {
        loop {
            let n = reader.read(&mut buf).map_err(|e| fail(e.to_string()))?;
            if n == 0 {
                return Ok(());
            }
            got += n as u64;
            if got > MAX_MANIFEST_BYTES {
                return Err(fail(format!("more than {MAX_MANIFEST_BYTES} bytes")));
            }
            file.write_all(&buf[..n]).map_err(write_err)?;
            progress.advance(n as u64);
        }
    })();
    progress.finish();
    copied?;
    file.sync_all().map_err(write_err)?;
    drop(file);

    // The digest of what is on disk, not of what went by.
    let text = read_bounded(&part)?;
    let actual = sha256_hex(&text);
    if let Some(expected) = &spec.sha256 {
        if actual != *expected {
            return Err(CalicoError::DigestMismatch {
                version: spec.version.clone(),
                url: spec.url.clone(),
                expected: expected.clone(),
                actual,
            });
        }
    } else {
        tracing::warn!(
            "Calico {}: {} is unpinned; downloaded sha256 {actual} (not verified)",
            spec.version,
            spec.url
        );
    }
    check_shape(&part, &text)?;
    fs::set_permissions(&part, fs::Permissions::from_mode(0o644)).map_err(write_err)?;
    fs::rename(&part, dest).map_err(|source| CalicoError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    guard.armed = false;
    tracing::info!("Calico {}: verified sha256 {actual}", spec.version);
    Ok(())
}

/// An exclusive lock on `path`, waiting (bounded) for another klab's download to finish.
fn lock(path: &Path) -> Result<fs::File, CalicoError> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| CalicoError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(CalicoError::Locked {
                    path: path.to_path_buf(),
                    secs: LOCK_WAIT.as_secs(),
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(CalicoError::Write {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, CalicoError> {
    let read_err = |source| CalicoError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(CalicoError::Shape {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let mut bytes = Vec::new();
    fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(CalicoError::TooLarge {
            path: path.to_path_buf(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    Ok(bytes)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The manifest holds what klab's patch (`calico/calico-node-patch.yaml.j2`) merges into: an
/// `apps/v1` DaemonSet `kube-system/calico-node` whose `calico-node` container has an `env` list.
pub fn check_shape(path: &Path, bytes: &[u8]) -> Result<(), CalicoError> {
    let bad = |reason: String| CalicoError::Shape {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
    let mut daemonset = None;
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = serde_norway::Value::deserialize(de)
            .map_err(|e| bad(format!("YAML document {}: {e}", i + 1)))?;
        let s = |v: &serde_norway::Value, key: &str| {
            v.get(key).and_then(|x| x.as_str()).map(str::to_string)
        };
        let meta = doc.get("metadata");
        if s(&doc, "kind").as_deref() == Some("DaemonSet")
            && meta.and_then(|m| s(m, "name")).as_deref() == Some("calico-node")
        {
            daemonset = Some(doc);
            break;
        }
    }
    let ds = daemonset.ok_or_else(|| bad("no DaemonSet `calico-node` in it".into()))?;
    let api = ds.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    if api != "apps/v1" {
        return Err(bad(format!(
            "DaemonSet `calico-node` has apiVersion `{api}`, not apps/v1"
        )));
    }
    let ns = ds
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if ns != "kube-system" {
        return Err(bad(format!(
            "DaemonSet `calico-node` is in namespace `{ns}`, not kube-system"
        )));
    }
    let containers = ds
        .get("spec")
        .and_then(|v| v.get("template"))
        .and_then(|v| v.get("spec"))
        .and_then(|v| v.get("containers"))
        .and_then(|v| v.as_sequence())
        .ok_or_else(|| {
            bad("DaemonSet `calico-node` has no spec.template.spec.containers".into())
        })?;
    let node = containers
        .iter()
        .find(|c| c.get("name").and_then(|v| v.as_str()) == Some("calico-node"))
        .ok_or_else(|| bad("DaemonSet `calico-node` has no container `calico-node`".into()))?;
    let env = node
        .get("env")
        .and_then(|v| v.as_sequence())
        .ok_or_else(|| bad("container `calico-node` has no env list".into()))?;
    if !env
        .iter()
        .all(|e| e.get("name").and_then(|v| v.as_str()).is_some())
    {
        return Err(bad(
            "container `calico-node` has an env entry without a name".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_covers_every_release_calico_version_accepts() {
        let versions: Vec<&str> = RELEASES.iter().map(|r| r.version).collect();
        assert_eq!(versions, crate::plan::versions::CALICO_RELEASES);
        assert_eq!(
            manifest_url("3.32.1"),
            "https://raw.githubusercontent.com/projectcalico/calico/v3.32.1/manifests/calico.yaml"
        );
        for r in RELEASES {
            if let Some(d) = r.sha256 {
                assert_eq!(d.len(), 64, "{}", r.version);
                assert!(
                    d.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                );
            }
        }
        assert_eq!(release("3.31.7").and_then(|r| r.sha256), None);
    }

    #[test]
    fn sha256_of_known_bytes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
