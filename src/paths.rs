//! Where klab keeps things on the host. Every root can be moved with an environment variable, so
//! tests and several users on one host never share state by accident.

use std::path::PathBuf;

/// Data root: images, per-lab pools, console logs. `KLAB_DATA_DIR`, default `/var/lib/klab`.
pub fn data_root() -> PathBuf {
    std::env::var_os("KLAB_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/klab"))
}

/// Root of the per-lab state directories. `KLAB_STATE_DIR`, default `<data root>/labs`.
pub fn state_root() -> PathBuf {
    std::env::var_os("KLAB_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| data_root().join("labs"))
}

pub fn image_cache() -> PathBuf {
    data_root().join("images")
}

pub fn pool_dir(lab: &str) -> PathBuf {
    data_root().join("pools").join(lab)
}

pub fn console_dir() -> PathBuf {
    data_root().join("console")
}
