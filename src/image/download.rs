//! Verified downloads into the cache: stream to a `.part` file unique to this process while hashing,
//! check, rename, then hash what is on disk once more. The caller holds the image's lock.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::checksum::{self, ChecksumKind, Hasher};
use super::{
    ImageCache, ImageError, Progress, download_hint, download_meta, hash_file, remove_stale_parts,
    unique_part_path,
};

/// What to download and how to verify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The digest is known up front (`sha256 = …` in the lab file).
    Digest {
        url: String,
        kind: ChecksumKind,
        /// Lower-case hex.
        hex: String,
    },
    /// The digest is read from a published checksum list (catalog images).
    ChecksumFile {
        url: String,
        checksum_url: String,
        kind: ChecksumKind,
    },
}

impl Source {
    pub fn url(&self) -> &str {
        match self {
            Self::Digest { url, .. } | Self::ChecksumFile { url, .. } => url,
        }
    }
}

fn agent() -> ureq::Agent {
    agent_with_body_bound(Duration::from_secs(3600))
}

/// The HTTP client of every host-side download (images, the Calico manifest): bounded connect and
/// response waits, and a bound on the whole body, since ureq has no idle timeout and a stalled
/// server must not hang `klab up`.
pub(crate) fn agent_with_body_bound(body: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_recv_body(Some(body))
        .user_agent(concat!("klab/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn download_error(key: &str, url: &str, reason: impl std::fmt::Display) -> ImageError {
    ImageError::Download {
        key: key.to_string(),
        url: url.to_string(),
        reason: reason.to_string(),
        hint: download_hint(key),
    }
}

/// Removes the partial file unless disarmed, so no failed download is left behind.
pub(crate) struct PartGuard<'a> {
    pub(crate) path: &'a Path,
    pub(crate) armed: bool,
}

impl Drop for PartGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(self.path);
        }
    }
}

pub(super) fn download(
    cache: &ImageCache,
    key: &str,
    source: &Source,
    progress: &dyn Progress,
) -> Result<PathBuf, ImageError> {
    let agent = agent();
    let url = source.url();
    let (kind, expected) = match source {
        Source::Digest { kind, hex, .. } => (*kind, hex.clone()),
        Source::ChecksumFile {
            checksum_url, kind, ..
        } => {
            tracing::info!("image `{key}`: fetching checksums from {checksum_url}");
            let list = agent
                .get(checksum_url)
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
                .map_err(|e| download_error(key, checksum_url, e))?;
            let file = checksum::url_file_name(url);
            let hex = checksum::find_checksum(&list, file, *kind).ok_or_else(|| {
                ImageError::ChecksumNotListed {
                    key: key.to_string(),
                    checksum_url: checksum_url.clone(),
                    file: file.to_string(),
                    kind: kind.as_str(),
                }
            })?;
            (*kind, hex)
        }
    };

    let dest = cache.base_path(key);
    remove_stale_parts(&dest);
    remove_stale_parts(&cache.meta_path(key));
    let part = unique_part_path(&dest);
    tracing::info!("image `{key}`: downloading {url}");
    let response = agent
        .get(url)
        .call()
        .map_err(|e| download_error(key, url, e))?;
    let total = response.body().content_length();
    let mut reader = response.into_body().into_reader();

    let write_err = |source| ImageError::Write {
        path: part.clone(),
        source,
    };
    let mut file = fs::File::create(&part).map_err(write_err)?;
    let mut guard = PartGuard {
        path: &part,
        armed: true,
    };
    let mut hasher = Hasher::new(kind);
    let mut buf = vec![0u8; 256 * 1024];
    progress.begin(&format!("downloading {key}"), total);
    let copied: Result<(), ImageError> = (|| {
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| download_error(key, url, e))?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(write_err)?;
            progress.advance(n as u64);
        }
    })();
    progress.finish();
    copied?;
    file.sync_all().map_err(write_err)?;
    drop(file);

    let actual = hasher.finish_hex();
    if actual != expected {
        return Err(ImageError::ChecksumMismatch {
            key: key.to_string(),
            url: url.to_string(),
            kind: kind.as_str(),
            expected,
            actual,
        });
    }
    // A checksum list can be right about the wrong thing (an HTML error page listed by mistake);
    // the overlays need a qcow2 backing file.
    let format = super::sniff_file(&part).map_err(|source| ImageError::Read {
        key: key.to_string(),
        path: part.clone(),
        source,
    })?;
    if format != super::DiskFormat::Qcow2 {
        return Err(download_error(
            key,
            url,
            format!("received {}, not qcow2", format.describe()),
        ));
    }
    fs::set_permissions(&part, fs::Permissions::from_mode(0o644)).map_err(write_err)?;
    // Metadata of an older file must not vouch for the new one, even for a moment.
    match fs::remove_file(cache.meta_path(key)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ImageError::Write {
                path: cache.meta_path(key),
                source,
            });
        }
    }
    fs::rename(&part, &dest).map_err(|source| ImageError::Write {
        path: dest.clone(),
        source,
    })?;
    guard.armed = false;
    // The stream's hash says what arrived; what counts is what the overlays will read.
    let on_disk = hash_file(key, &dest, kind)?;
    if on_disk != expected {
        let _ = fs::remove_file(&dest);
        return Err(ImageError::ChangedOnDisk {
            key: key.to_string(),
            path: dest,
            kind: kind.as_str(),
            expected,
            actual: on_disk,
        });
    }
    cache.write_meta(&download_meta(key, url, kind, &expected, &dest)?)?;
    tracing::info!("image `{key}`: verified {} {expected}", kind.as_str());
    Ok(dest)
}
