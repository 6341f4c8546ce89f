//! The base VHDX a lab's differencing disks sit on: converted once from the cached qcow2 with
//! `qemu-img convert -f qcow2 -O vhdx -o subformat=dynamic`, into a `.part` file renamed into place,
//! and reused while it is newer than the qcow2. Runs on the Linux side (WSL2 writes it under
//! `/mnt/c/…`; keep VHDX files on a local NTFS/ReFS path, not `\\wsl$`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::runner::bounded;
use super::vhdx_convert_args;

/// A 20 GiB cloud image converts in well under this on a slow disk.
pub const CONVERT_TIMEOUT: Duration = Duration::from_secs(900);

/// `Ok(true)` when it converted, `Ok(false)` when the cached VHDX is current.
pub fn ensure_base_vhdx(qcow2: &Path, vhdx: &Path, timeout: Duration) -> Result<bool, String> {
    let src_time = std::fs::metadata(qcow2)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}", qcow2.display()))?;
    if let Ok(t) = std::fs::metadata(vhdx).and_then(|m| m.modified())
        && t >= src_time
    {
        tracing::debug!(vhdx = %vhdx.display(), "base VHDX is current");
        return Ok(false);
    }
    if let Some(dir) = vhdx.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let part = vhdx.with_extension(format!("vhdx.part-{}", std::process::id()));
    let args = vhdx_convert_args(&qcow2.to_string_lossy(), &part.to_string_lossy());
    let out = bounded(
        Command::new("qemu-img").args(&args),
        timeout,
        "qemu-img convert",
    )
    .map_err(|e| e.to_string());
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    if out.code != Some(0) {
        let _ = std::fs::remove_file(&part);
        return Err(format!(
            "qemu-img convert {} → {} failed: {}",
            qcow2.display(),
            vhdx.display(),
            out.stderr.trim()
        ));
    }
    std::fs::rename(&part, vhdx).map_err(|e| format!("{}: {e}", vhdx.display()))?;
    Ok(true)
}
