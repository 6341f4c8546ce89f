//! Host tools the tests drive (`blkid`, `fsck.vfat`, `mdir`, `virt-xml-validate`, `cloud-init` …).
//!
//! A missing tool FAILS the test that needs it, so a test can never pass without having run.
//! On a machine that cannot install them, `KLAB_TEST_ALLOW_MISSING_TOOLS=1` turns that into a skip
//! that says so on stderr (scripts/setup-host.sh installs every one of them).

use std::path::{Path, PathBuf};

/// The named opt-out.
pub const ALLOW_MISSING: &str = "KLAB_TEST_ALLOW_MISSING_TOOLS";

pub fn allow_missing() -> bool {
    std::env::var(ALLOW_MISSING).is_ok_and(|v| v == "1")
}

/// Where `name` is installed (system directories first, then `PATH`); `None` only when it is missing
/// and the opt-out is set. `package` is the Debian package that provides it, for the message.
pub fn require(name: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .into_iter()
        .chain(path.split(':').filter(|d| !d.is_empty()))
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            allow_missing(),
            "`{name}` is not installed: this test needs it (apt-get install {package}, or run \
             scripts/setup-host.sh); set {ALLOW_MISSING}=1 to skip such tests instead"
        );
        eprintln!("SKIPPED: `{name}` not installed and {ALLOW_MISSING}=1");
    }
    found
}

#[test]
fn tool_lookup_finds_sh_and_fails_on_a_missing_tool() {
    assert!(require("sh", "dash").is_some());
    if allow_missing() {
        assert_eq!(require("klab-no-such-tool", "none"), None);
    } else {
        let err = std::panic::catch_unwind(|| require("klab-no-such-tool", "none")).unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("`klab-no-such-tool` is not installed"),
            "{msg}"
        );
        assert!(msg.contains(ALLOW_MISSING), "{msg}");
    }
}
