//! Cluster identity klab makes itself (not pure: randomness and the clock come in here): the
//! cluster CA (ECDSA P-256, matching `encryptionAlgorithm: ECDSA-P256`), the discovery hash joins
//! pin it by, the bootstrap token and the certificate key.
//!
//! With the CA made before `kubeadm init` (kubeadm reuses an existing `pki/ca.{crt,key}`), the
//! `caCertHashes` value is known up front, so every join config is complete before the cluster exists.

use std::time::{Duration, SystemTime};

use rand::RngExt;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData,
};
use sha2::{Digest, Sha256};
use x509_cert::der::{self, DecodePem, Encode};

use crate::plan::secret::Secret;

/// How long klab's cluster CA is valid (kubeadm's own CA lifetime).
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot generate the cluster CA")]
    Generate(#[source] rcgen::Error),
    #[error("the cluster CA certificate is not a PEM X.509 certificate")]
    ParseCert(#[source] der::Error),
    #[error("cannot encode the CA's public key")]
    Encode(#[source] der::Error),
}

/// The cluster CA: certificate (public) and private key (secret), both PEM.
#[derive(Debug, Clone)]
pub struct ClusterCa {
    pub cert_pem: String,
    pub key_pem: Secret,
    /// `sha256:<hex>` of the certificate's SubjectPublicKeyInfo (kubeadm's `caCertHashes`).
    pub cert_hash: String,
}

/// A new ECDSA P-256 CA named `kubernetes` (as kubeadm names its own), valid from an hour before
/// `now` (clock skew between host and nodes) for [`CA_VALIDITY`].
pub fn generate_ca(now: SystemTime) -> Result<ClusterCa, IdentityError> {
    // rcgen's default key: ECDSA P-256 with SHA-256.
    let key = KeyPair::generate().map_err(IdentityError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kubernetes");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyCertSign,
    ];
    let start = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
    params.not_before = time::OffsetDateTime::from(start);
    params.not_after = time::OffsetDateTime::from(now + CA_VALIDITY);
    let cert = params.self_signed(&key).map_err(IdentityError::Generate)?;
    Ok(ClusterCa {
        cert_pem: cert.pem(),
        key_pem: Secret::new(key.serialize_pem()),
        cert_hash: spki_hash(&key.subject_public_key_info()),
    })
}

/// `sha256:<hex>` of a SubjectPublicKeyInfo in DER.
pub fn spki_hash(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The `caCertHashes` value of a PEM certificate (what `kubeadm token create --print-join-command`
/// prints): for a CA klab finds in the state directory.
pub fn ca_cert_hash(cert_pem: &str) -> Result<String, IdentityError> {
    let cert = x509_cert::Certificate::from_pem(cert_pem).map_err(IdentityError::ParseCert)?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(IdentityError::Encode)?;
    Ok(spki_hash(&spki))
}

const TOKEN_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_word(rng: &mut impl RngExt, len: usize) -> String {
    (0..len)
        .map(|_| TOKEN_ALPHABET[rng.random_range(0..TOKEN_ALPHABET.len())] as char)
        .collect()
}

/// A kubeadm bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}`.
pub fn bootstrap_token() -> Secret {
    let mut rng = rand::rng();
    let id = random_word(&mut rng, 6);
    let secret = random_word(&mut rng, 16);
    Secret::new(format!("{id}.{secret}"))
}

/// keepalived's VRRP password: 8 characters, the most VRRP's `auth_type PASS` carries.
pub fn vrrp_password() -> Secret {
    Secret::new(random_word(&mut rand::rng(), 8))
}

/// A kubeadm certificate key: 32 random bytes, hex (64 characters).
pub fn certificate_key() -> Secret {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj /CN=kubernetes`.
    const FIXED_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBgDCCASWgAwIBAgIUHE91uLKv2O1M3gdwVu/w1Yy1sSUwCgYIKoZIzj0EAwIw
FTETMBEGA1UEAwwKa3ViZXJuZXRlczAeFw0yNjEyMDEyMDUwMjFaFw0zNjExMjgy
MDUwMjFaMBUxEzARBgNVBAMMCmt1YmVybmV0ZXMwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAS4yEZt/dFE+5BWvd22dr1s4mU18xvF1cTpvIALETGDNNAkf5x6NJHX
A3UY7mfzTfXqa2Jk4aQP8slzeP2ESRa0o1MwUTAdBgNVHQ4EFgQUtPt5CSBNRT9M
LoogvMP3XyfRZicwHwYDVR0jBBgwFoAUtPt5CSBNRT9MLoogvMP3XyfRZicwDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEA6uJZqrUOsRtFtXb9EHy7
DG2e3zLp+9noPyc4ixEzwXQCIQDfMWOMS6R3HNjomiy4E/vdj/12e8IhdkJlpEA8
VUE+1w==
-----END CERTIFICATE-----
";

    #[test]
    fn hash_of_a_fixed_certificate() {
        // Expected value from `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`,
        // kubeadm's documented way to compute it.
        assert_eq!(
            ca_cert_hash(FIXED_CA).unwrap(),
            "sha256:0d85ef031b4b9a377e3170a57db66df240ab1b4676042a00bb944532cb6305c8"
        );
        assert!(matches!(
            ca_cert_hash("not a certificate"),
            Err(IdentityError::ParseCert(_))
        ));
    }

    #[test]
    fn generated_ca_is_ecdsa_p256_and_its_hash_matches_the_certificate() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let ca = generate_ca(now).unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(
            ca.key_pem
                .expose()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert_eq!(ca_cert_hash(&ca.cert_pem).unwrap(), ca.cert_hash);
        assert_eq!(ca.cert_hash.len(), "sha256:".len() + 64);
        let cert = x509_cert::Certificate::from_pem(&ca.cert_pem).unwrap();
        let spki = cert.tbs_certificate().subject_public_key_info();
        // id-ecPublicKey with the prime256v1 curve.
        assert_eq!(spki.algorithm.oid.to_string(), "1.2.840.10045.2.1");
        assert_eq!(
            spki.algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
                .map(|o| o.to_string())
                .as_deref(),
            Some("1.2.840.10045.3.1.7")
        );
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn token_and_certificate_key_have_kubeadms_shapes() {
        let t = bootstrap_token();
        let (id, secret) = t.expose().split_once('.').unwrap();
        assert_eq!((id.len(), secret.len()), (6, 16));
        assert!(
            id.bytes()
                .chain(secret.bytes())
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_ne!(bootstrap_token(), t);
        let k = certificate_key();
        assert_eq!(k.expose().len(), 64);
        assert!(
            k.expose()
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(certificate_key(), k);
        assert_eq!(format!("{k:?}"), "Secret(<redacted>)");
    }
}
