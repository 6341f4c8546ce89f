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

    #[test]
    fn mac_is_derived_from_sha256_of_lab_node_index() {
        let m = mac("demo", "cp1", 0);
        let d = Sha256::digest(b"demo/cp1/0");
        assert_eq!(
            m,
            format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2])
        );
        assert_eq!(m.len(), 17);
    }

    #[test]
    fn macs_differ_per_lab_node_and_nic() {
        let base = mac("demo", "cp1", 0);
        assert_ne!(base, mac("demo", "cp1", 1));
        assert_ne!(base, mac("demo", "cp2", 0));
        assert_ne!(base, mac("other", "cp1", 0));
        assert_eq!(base, mac("demo", "cp1", 0));
    }
}
