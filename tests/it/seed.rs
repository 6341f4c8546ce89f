//! The vfat seed as the host tools see it: blkid label/type, a clean read-only fsck, mtools' listing.
//! A missing tool fails these tests unless `KLAB_TEST_ALLOW_MISSING_TOOLS=1` (see tools.rs).

use std::process::Command;

use klab::seed::build_vfat_seed;

use super::tools;

fn seed_files() -> Vec<(&'static str, &'static [u8])> {
    vec![
        (
            "meta-data",
            b"instance-id: kltest-cp1\nlocal-hostname: cp1\n",
        ),
        (
            "user-data",
            b"#cloud-config\nhostname: cp1\nssh_pwauth: false\n",
        ),
        (
            "network-config",
            b"version: 2\nethernets:\n  ext0:\n    match: {macaddress: \"52:54:00:00:00:01\"}\n",
        ),
    ]
}

#[test]
fn blkid_sees_cidata_vfat() {
    let Some(blkid) = tools::require("blkid", "util-linux") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    std::fs::write(&path, build_vfat_seed(&seed_files()).unwrap()).unwrap();
    let out = Command::new(blkid)
        .args(["-p", "-o", "export"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "blkid failed: {text}");
    assert!(text.lines().any(|l| l == "LABEL=CIDATA"), "{text}");
    assert!(text.lines().any(|l| l == "TYPE=vfat"), "{text}");
    assert!(text.lines().any(|l| l == "VERSION=FAT12"), "{text}");
}

#[test]
fn fsck_vfat_finds_no_errors_and_lists_the_files() {
    let Some(fsck) = tools::require("fsck.vfat", "dosfstools") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    std::fs::write(&path, build_vfat_seed(&seed_files()).unwrap()).unwrap();
    let out = Command::new(fsck)
        .args(["-n", "-v"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fsck.vfat reported problems:\n{text}");
    assert!(!text.contains("Dirty bit"), "{text}");
    // Three one-cluster files in use (fsck also counts the root directory as a file).
    assert!(text.contains(" files, 3/"), "{text}");
}

#[test]
fn mtools_listing_shows_long_names() {
    let Some(mdir) = tools::require("mdir", "mtools") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    std::fs::write(&path, build_vfat_seed(&seed_files()).unwrap()).unwrap();
    let out = Command::new(mdir)
        .arg("-i")
        .arg(&path)
        .arg("::")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["meta-data", "user-data", "network-config"] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}
