//! Checksums: streaming hashers and the parsing of published checksum lists. Pure (no I/O).

use sha2::{Digest, Sha256, Sha512};

pub use crate::catalog::ChecksumKind;

impl ChecksumKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// Length of the digest in hex characters.
    pub fn hex_len(self) -> usize {
        match self {
            Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sha256" => Some(Self::Sha256),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }
}

/// A digest computed over a stream, fed chunk by chunk.
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(kind: ChecksumKind) -> Self {
        match kind {
            ChecksumKind::Sha256 => Self::Sha256(Sha256::new()),
            ChecksumKind::Sha512 => Self::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    /// Lower-case hex digest.
    pub fn finish_hex(self) -> String {
        match self {
            Self::Sha256(h) => to_hex(&h.finalize()),
            Self::Sha512(h) => to_hex(&h.finalize()),
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn is_hex_of_len(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Finds the digest for `file_name` in a published checksum list.
///
/// Understands GNU coreutils lines (`<hex>  <name>`, `<hex> *<name>` for binary mode) and BSD/`--tag`
/// lines (`SHA256 (<name>) = <hex>`). Names are compared on their last path component, since some lists
/// carry `./name` or a subdirectory. The digest must have the length `kind` implies, so a SHA-256 line
/// is never taken for a SHA-512 entry. Returns the digest in lower case.
pub fn find_checksum(list: &str, file_name: &str, kind: ChecksumKind) -> Option<String> {
    let want = base_name(file_name);
    list.lines().find_map(|line| {
        let (name, hex) = parse_line(line.trim())?;
        (base_name(name) == want && is_hex_of_len(hex, kind.hex_len()))
            .then(|| hex.to_ascii_lowercase())
    })
}

fn base_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// One checksum line as `(file name, hex digest)`; `None` for comments, signatures and blank lines.
fn parse_line(line: &str) -> Option<(&str, &str)> {
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    // BSD style: `ALGO (name) = hex`.
    if let Some(open) = line.find(" (")
        && let Some(close) = line.rfind(") = ")
        && close > open
    {
        let algo = &line[..open];
        if algo.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Some((&line[open + 2..close], line[close + 4..].trim()));
        }
    }
    // GNU style: `hex  name` or `hex *name`.
    let (hex, rest) = line.split_once(char::is_whitespace)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let name = rest.trim_start();
    let name = name.strip_prefix('*').unwrap_or(name);
    (!name.is_empty()).then_some((name, hex))
}

/// Last path segment of a URL (without query or fragment): the file name checksum lists use.
pub fn url_file_name(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    base_name(&url[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const H256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    /// sha512("test"), from `printf test | sha512sum`.
    fn h512() -> String {
        "ee26b0dd4af7e749aa1a8ee3c10ae9923f618980772e473f8819a5d4940e0db2\
         7ac185f8a0e1d5f84f88bc887fd67b143732c304cc5fa9ad8e6f57f50028a8ff"
            .to_string()
    }

    #[test]
    fn hashers_match_known_vectors() {
        let mut h = Hasher::new(ChecksumKind::Sha256);
        h.update(b"te");
        h.update(b"st");
        assert_eq!(h.finish_hex(), H256);
        let mut h = Hasher::new(ChecksumKind::Sha512);
        h.update(b"test");
        assert_eq!(h.finish_hex(), h512());
    }

    #[test]
    fn gnu_format_text_and_binary_mode() {
        let list = format!(
            "{}  other.qcow2\n{H256}  debian-12-genericcloud-amd64.qcow2\n",
            "0".repeat(64)
        );
        assert_eq!(
            find_checksum(
                &list,
                "debian-12-genericcloud-amd64.qcow2",
                ChecksumKind::Sha256
            ),
            Some(H256.to_string())
        );
        let binary = format!("{}\t*noble.img\n", H256.to_uppercase());
        assert_eq!(
            find_checksum(&binary, "noble.img", ChecksumKind::Sha256),
            Some(H256.to_string())
        );
    }

    #[test]
    fn bsd_format_with_comments_and_signature_noise() {
        let list = format!(
            "# AlmaLinux checksums\n-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n\
             SHA256 (AlmaLinux-9-GenericCloud-9.5.x86_64.qcow2) = {}\n\
             SHA256 (AlmaLinux-9-GenericCloud-latest.x86_64.qcow2) = {H256}\n",
            "1".repeat(64)
        );
        assert_eq!(
            find_checksum(
                &list,
                "AlmaLinux-9-GenericCloud-latest.x86_64.qcow2",
                ChecksumKind::Sha256
            ),
            Some(H256.to_string())
        );
    }

    #[test]
    fn digest_length_must_match_kind() {
        let list = format!("{H256}  a.qcow2\n");
        assert_eq!(find_checksum(&list, "a.qcow2", ChecksumKind::Sha512), None);
        let list512 = format!("{}  a.qcow2\n", h512());
        assert_eq!(
            find_checksum(&list512, "a.qcow2", ChecksumKind::Sha512),
            Some(h512())
        );
    }

    #[test]
    fn names_compare_on_last_component_and_missing_is_none() {
        let list = format!("{H256}  ./images/a.qcow2\n");
        assert_eq!(
            find_checksum(&list, "a.qcow2", ChecksumKind::Sha256),
            Some(H256.to_string())
        );
        assert_eq!(find_checksum(&list, "b.qcow2", ChecksumKind::Sha256), None);
        assert_eq!(find_checksum("", "a.qcow2", ChecksumKind::Sha256), None);
    }

    #[test]
    fn url_file_names() {
        assert_eq!(url_file_name("https://x/y/z.qcow2"), "z.qcow2");
        assert_eq!(url_file_name("http://127.0.0.1:80/a.img?x=1#f"), "a.img");
    }
}
