//! SSH key material klab generates and pins: ed25519 keypairs in OpenSSH format, SHA256
//! fingerprints, comment-insensitive comparison and `known_hosts` lines.
//!
//! Keys are compared by key data, never by `PublicKey`'s `PartialEq`, which includes the comment
//! (a pinned `root@cp1` key would otherwise differ from the same key presented by sshd).

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot generate an ed25519 key")]
    Generate(#[source] russh::keys::ssh_key::Error),
    #[error("cannot encode the generated ed25519 key in OpenSSH format")]
    Encode(#[source] russh::keys::ssh_key::Error),
    #[error("invalid OpenSSH public key `{shown}`")]
    InvalidPublic {
        shown: String,
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    #[error("invalid OpenSSH private key")]
    InvalidPrivate(#[source] russh::keys::ssh_key::Error),
}

/// A fresh ed25519 keypair: (private key as OpenSSH PEM with LF line endings, public key line
/// `ssh-ed25519 AAAA… comment`).
pub fn generate_ed25519(comment: &str) -> Result<(String, String), KeyError> {
    let mut key =
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(KeyError::Generate)?;
    key.set_comment(comment);
    let private = key.to_openssh(LineEnding::LF).map_err(KeyError::Encode)?;
    let public = key.public_key().to_openssh().map_err(KeyError::Encode)?;
    Ok((private.to_string(), public))
}

/// Parses one OpenSSH public key line (`type base64 [comment]`), surrounding whitespace ignored.
pub fn parse_public(public_openssh: &str) -> Result<PublicKey, KeyError> {
    PublicKey::from_openssh(public_openssh.trim()).map_err(|source| KeyError::InvalidPublic {
        shown: shorten(public_openssh.trim()),
        source,
    })
}

/// Parses an unencrypted OpenSSH private key (PEM).
pub fn parse_private(private_openssh: &str) -> Result<PrivateKey, KeyError> {
    PrivateKey::from_openssh(private_openssh.trim()).map_err(KeyError::InvalidPrivate)
}

/// The public key line (`ssh-ed25519 AAAA… comment`) that belongs to a private key.
pub fn public_of_private(private_openssh: &str) -> Result<String, KeyError> {
    parse_private(private_openssh)?
        .public_key()
        .to_openssh()
        .map_err(KeyError::Encode)
}

/// The OpenSSH SHA256 fingerprint (`SHA256:` + unpadded base64) of a public key line.
pub fn fingerprint(public_openssh: &str) -> Result<String, KeyError> {
    Ok(fingerprint_of(&parse_public(public_openssh)?))
}

/// The OpenSSH SHA256 fingerprint of a parsed key.
pub fn fingerprint_of(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// True when both lines parse and carry the same key (type and key bytes); comments are ignored.
pub fn public_key_data_eq(a: &str, b: &str) -> bool {
    match (parse_public(a), parse_public(b)) {
        (Ok(a), Ok(b)) => a.key_data() == b.key_data(),
        _ => false,
    }
}

/// One `known_hosts` line: `host1,host2 <type> <base64>` (the key's comment dropped).
///
/// Hosts are written as given; for a port other than 22 pass `[addr]:port`. A key that does not
/// parse is written as its first two fields so the caller's file stays line-oriented.
pub fn known_hosts_line(hosts: &[String], public_openssh: &str) -> String {
    let key = match parse_public(public_openssh) {
        Ok(mut key) => {
            key.set_comment("");
            key.to_openssh()
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| first_two_fields(public_openssh))
        }
        Err(_) => first_two_fields(public_openssh),
    };
    format!("{} {}", hosts.join(","), key)
}

fn first_two_fields(s: &str) -> String {
    s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// Keeps error messages readable when someone passes a whole file instead of one key.
fn shorten(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pair_is_openssh_and_matches() {
        let (private, public) = generate_ed25519("klab@cp1").unwrap();
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(
            private
                .trim_end()
                .ends_with("-----END OPENSSH PRIVATE KEY-----")
        );
        assert!(!private.contains('\r'));
        assert!(public.starts_with("ssh-ed25519 AAAA"));
        assert!(public.ends_with(" klab@cp1"));
        let derived = public_of_private(&private).unwrap();
        assert!(public_key_data_eq(&derived, &public));
    }

    #[test]
    fn two_generated_keys_differ() {
        let (_, a) = generate_ed25519("a").unwrap();
        let (_, b) = generate_ed25519("a").unwrap();
        assert!(!public_key_data_eq(&a, &b));
        assert_ne!(fingerprint(&a).unwrap(), fingerprint(&b).unwrap());
    }

    #[test]
    fn comparison_ignores_comment_and_whitespace() {
        let (_, public) = generate_ed25519("root@cp1").unwrap();
        let bare = first_two_fields(&public);
        let other_comment = format!("  {bare} someone@else \n");
        assert!(public_key_data_eq(&public, &bare));
        assert!(public_key_data_eq(&public, &other_comment));
        assert_eq!(
            fingerprint(&public).unwrap(),
            fingerprint(&other_comment).unwrap()
        );
    }

    #[test]
    fn garbage_never_compares_equal() {
        assert!(!public_key_data_eq("nope", "nope"));
        assert!(!public_key_data_eq("", ""));
    }

    #[test]
    fn fingerprint_has_openssh_shape() {
        let (_, public) = generate_ed25519("x").unwrap();
        let fp = fingerprint(&public).unwrap();
        let b64 = fp.strip_prefix("SHA256:").unwrap();
        // 32 bytes of SHA-256 in unpadded base64.
        assert_eq!(b64.len(), 43);
        assert!(!b64.contains('='));
    }

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        // Expected value from `ssh-keygen -lf` on this public key, not from klab's own code.
        let public =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDeVmudxss5AY7XDDZppF8eLd01xRqRWNX+OFdhfBc40 x";
        assert_eq!(
            fingerprint(public).unwrap(),
            "SHA256:ifdeGfEE47OFUqdoe0pgnWItazXemOndsuj36+zrDaU"
        );
    }

    #[test]
    fn invalid_public_key_error_names_the_key() {
        let err = fingerprint("ssh-ed25519 not-base64 c").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("ssh-ed25519 not-base64"), "{msg}");
        let long = "x".repeat(500);
        let msg = parse_public(&long).unwrap_err().to_string();
        assert!(msg.len() < 120, "{msg}");
    }

    #[test]
    fn invalid_private_key_is_an_error() {
        assert!(matches!(
            parse_private("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n"),
            Err(KeyError::InvalidPrivate(_))
        ));
    }

    #[test]
    fn known_hosts_line_drops_comment() {
        let (_, public) = generate_ed25519("root@cp1").unwrap();
        let hosts = vec!["cp1".to_string(), "[10.0.0.11]:2222".to_string()];
        let line = known_hosts_line(&hosts, &public);
        let bare = first_two_fields(&public);
        assert_eq!(line, format!("cp1,[10.0.0.11]:2222 {bare}"));
        assert!(!line.contains("root@cp1"));
    }

    #[test]
    fn known_hosts_line_keeps_unparsable_key_on_one_line() {
        let line = known_hosts_line(&["h".to_string()], "type blob comment\nextra");
        assert_eq!(line, "h type blob");
    }
}
