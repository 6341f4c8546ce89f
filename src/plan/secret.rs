//! `Secret`: a string that never shows itself in `Debug`, `Display`-less, and serializes redacted.
//!
//! Bootstrap tokens, certificate keys, the cluster CA key and the admin kubeconfig travel through
//! klab as `Secret`s, so a stray `{:?}`, a log line or `klab plan -o json` cannot leak them.

use serde::{Serialize, Serializer};

/// What `Debug` and `Serialize` show instead of the value.
pub const REDACTED: &str = "<redacted>";

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value itself: only for writing it where it belongs (a 0600 file, a node's stdin).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({REDACTED})")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_serialize_redact() {
        let s = Secret::new("abcdef.0123456789abcdef");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "abcdef.0123456789abcdef");
        #[derive(Debug, Serialize)]
        struct Holder {
            token: Secret,
        }
        let h = Holder { token: s };
        assert!(!format!("{h:?}").contains("abcdef"));
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"token":"<redacted>"}"#
        );
    }
}
