//! Which Kubernetes and Calico releases klab builds, as data (see docs: provisioner facts, 2026-12-01).

use std::fmt;

/// Oldest minor klab accepts: kubeadm's `v1beta4` config API exists from 1.31 on.
pub const MIN_MINOR: u32 = 31;
/// Minors the Kubernetes project supports today (1.34 reached end of life on 2026-10-27).
pub const SUPPORTED_MINORS: [u32; 3] = [35, 36, 37];
/// Calico releases klab has pinned, newest first; the first is the default.
pub const CALICO_RELEASES: [&str; 2] = ["3.32.1", "3.31.7"];

/// How klab stands to a Kubernetes version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Supported,
    /// Older than the supported minors but still buildable with v1beta4: accepted with a warning.
    EndOfLife,
    /// Newer than the supported minors: accepted with a warning (not checked by klab yet).
    Newer,
    /// Not `1.x`, or older than [`MIN_MINOR`]: refused.
    TooOld,
}

/// A parsed `1.NN` or `1.NN.P` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct K8sVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: Option<u32>,
}

impl K8sVersion {
    /// `"1.36"` / `"1.36.4"`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('.');
        let num = |p: Option<&str>| -> Option<u32> {
            let p = p?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let major = num(it.next())?;
        let minor = num(it.next())?;
        let patch = match it.next() {
            None => None,
            Some(p) => Some(num(Some(p))?),
        };
        if it.next().is_some() {
            return None;
        }
        Some(Self {
            major,
            minor,
            patch,
        })
    }

    pub fn support(&self) -> Support {
        let newest = SUPPORTED_MINORS[SUPPORTED_MINORS.len() - 1];
        match (self.major, self.minor) {
            (1, m) if SUPPORTED_MINORS.contains(&m) => Support::Supported,
            (1, m) if m > newest => Support::Newer,
            (1, m) if m >= MIN_MINOR => Support::EndOfLife,
            _ => Support::TooOld,
        }
    }

    /// `v1.36`: the pkgs.k8s.io repository path component.
    pub fn minor_tag(&self) -> String {
        format!("v{}.{}", self.major, self.minor)
    }
}

impl fmt::Display for K8sVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if let Some(p) = self.patch {
            write!(f, ".{p}")?;
        }
        Ok(())
    }
}

/// `1.35, 1.36 and 1.37`, for messages.
pub fn supported_list() -> String {
    let v: Vec<String> = SUPPORTED_MINORS.iter().map(|m| format!("1.{m}")).collect();
    match v.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => v.join(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minor_and_patch_versions() {
        assert_eq!(
            K8sVersion::parse("1.36.4"),
            Some(K8sVersion {
                major: 1,
                minor: 36,
                patch: Some(4)
            })
        );
        assert_eq!(K8sVersion::parse("1.36").map(|v| v.patch), Some(None));
        for bad in ["1", "1.", "1.36.", "v1.36", "1.36.4.1", "1.3x", ""] {
            assert_eq!(K8sVersion::parse(bad), None, "{bad}");
        }
        assert_eq!(
            K8sVersion::parse("1.36.4").map(|v| v.minor_tag()),
            Some("v1.36".to_string())
        );
    }

    #[test]
    fn support_window() {
        let s = |v: &str| K8sVersion::parse(v).map(|v| v.support());
        assert_eq!(s("1.36"), Some(Support::Supported));
        assert_eq!(s("1.35.9"), Some(Support::Supported));
        assert_eq!(s("1.37"), Some(Support::Supported));
        assert_eq!(s("1.34"), Some(Support::EndOfLife));
        assert_eq!(s("1.31"), Some(Support::EndOfLife));
        assert_eq!(s("1.30"), Some(Support::TooOld));
        assert_eq!(s("2.1"), Some(Support::TooOld));
        assert_eq!(s("1.38"), Some(Support::Newer));
        assert_eq!(supported_list(), "1.35, 1.36 and 1.37");
    }
}
