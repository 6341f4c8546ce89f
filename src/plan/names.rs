//! Object naming conventions (OWNERSHIP.md): every name klab gives a libvirt object or guest NIC.

use sha2::{Digest, Sha256};

/// Lowercase hex of sha256(`input`).
pub fn sha256_hex(input: &[u8]) -> String {
    let digest = Sha256::digest(input);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(hex_digit(b >> 4));
        out.push(hex_digit(b & 0x0f));
    }
    out
}

fn hex_digit(n: u8) -> char {
    char::from_digit(u32::from(n), 16).unwrap_or('0')
}

/// `klab-<lab>`: prefix of every object name, and the name of a pool klab creates.
pub fn prefix(lab: &str) -> String {
    format!("klab-{lab}")
}

pub fn pool_name(lab: &str) -> String {
    prefix(lab)
}

pub fn network_name(lab: &str, key: &str) -> String {
    format!("klab-{lab}-{key}")
}

pub fn domain_name(lab: &str, node: &str) -> String {
    format!("klab-{lab}-{node}")
}

pub fn overlay_volume(node: &str) -> String {
    format!("{node}.qcow2")
}

pub fn seed_volume(node: &str) -> String {
    format!("{node}-seed.img")
}

/// Linux bridge for a nat/isolated network: `kl-` + 8 hex chars of sha256("<lab>/<key>"), always
/// 11 characters (the kernel limit is 15) and distinct across labs sharing a host.
pub fn bridge_name(lab: &str, key: &str) -> String {
    let hash = sha256_hex(format!("{lab}/{key}").as_bytes());
    format!("kl-{}", &hash[..8])
}

/// Guest interface name for NIC `index`; `cluster` marks the NIC on the Kubernetes cluster network.
pub fn ifname(index: usize, cluster: bool) -> String {
    match (cluster, index) {
        (true, _) => "lab0".to_string(),
        (false, 0) => "ext0".to_string(),
        (false, i) => format!("net{i}"),
    }
}

/// `<dir>/<file>` without doubling a trailing slash; empty when the directory is unknown.
pub fn join_path(dir: &str, file: &str) -> String {
    if dir.is_empty() {
        String::new()
    } else if dir.ends_with('/') {
        format!("{dir}{file}")
    } else {
        format!("{dir}/{file}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    // Expected values computed independently: `printf demo/cluster | sha256sum` starts with e50b38c9.
    #[test]
    fn bridge_names_are_stable_literals() {
        assert_eq!(bridge_name("demo", "cluster"), "kl-e50b38c9");
        assert_eq!(bridge_name("demo2", "cluster"), "kl-32c917f5");
        assert_eq!(bridge_name("demo", "outside"), "kl-6c20e205");
    }

    #[test]
    fn object_names_are_literals() {
        assert_eq!(prefix("demo"), "klab-demo");
        assert_eq!(pool_name("demo"), "klab-demo");
        assert_eq!(network_name("demo", "cluster"), "klab-demo-cluster");
        assert_eq!(domain_name("demo", "cp1"), "klab-demo-cp1");
        assert_eq!(overlay_volume("cp1"), "cp1.qcow2");
        assert_eq!(seed_volume("cp1"), "cp1-seed.img");
    }

    #[test]
    fn ifnames_follow_convention() {
        assert_eq!(ifname(0, false), "ext0");
        assert_eq!(ifname(1, true), "lab0");
        assert_eq!(ifname(0, true), "lab0");
        assert_eq!(ifname(2, false), "net2");
    }

    #[test]
    fn join_path_handles_slashes_and_unknown_dirs() {
        assert_eq!(join_path("/a/b", "c"), "/a/b/c");
        assert_eq!(join_path("/a/b/", "c"), "/a/b/c");
        assert_eq!(join_path("", "c"), "");
    }
}
