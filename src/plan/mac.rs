//! Stable MAC addresses: `52:54:00:` (the QEMU/libvirt OUI) + 3 bytes of sha256("<lab>/<node>/<nic index>").

use sha2::{Digest, Sha256};

pub fn mac(lab: &str, node: &str, index: usize) -> String {
    let digest = Sha256::digest(format!("{lab}/{node}/{index}").as_bytes());
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed independently: `printf demo/cp1/0 | sha256sum` starts with c13405….
    #[test]
    fn macs_are_stable_literals() {
        assert_eq!(mac("demo", "cp1", 0), "52:54:00:c1:34:05");
        assert_eq!(mac("demo", "cp1", 1), "52:54:00:b9:b4:5e");
        assert_eq!(mac("demo", "cp2", 0), "52:54:00:38:0f:26");
        assert_eq!(mac("other", "cp1", 0), "52:54:00:cc:1b:67");
    }
}
