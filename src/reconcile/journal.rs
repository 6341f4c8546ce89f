//! PURE: the per-lab journal — which node reached which step of its bring-up, with the hash of
//! the seed it was built from. `up` writes it (atomically, through `state`) as it goes; the
//! reconciler reads it so that a rerun after a crash re-waits and re-verifies every node that was
//! not verified with its current seed. The provisioner extends a node's record with its phases.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Format version written by this klab. Older files (without `version`) read as version 0.
pub const JOURNAL_VERSION: u32 = 1;

/// Steps of one node's bring-up, in order. A node at `Verified` with its current seed hash is
/// up to date; anything less must be waited for and verified again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Overlay,
    Seed,
    Defined,
    Started,
    Ssh,
    CloudInit,
    Verified,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Overlay => "overlay",
            Self::Seed => "seed",
            Self::Defined => "defined",
            Self::Started => "started",
            Self::Ssh => "ssh",
            Self::CloudInit => "cloud-init",
            Self::Verified => "verified",
        }
    }
}

/// A provisioning phase of one node (filled in by the provisioner; empty until then).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PhaseRecord {
    /// `done`, `failed`, … as the provisioner defines them.
    pub status: String,
    /// Hash of what the phase applied, so a changed input reruns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The furthest step this node reached with `seed_hash`.
    pub step: Step,
    /// sha256 (hex) of the node's rendered seed (meta-data, user-data, network-config).
    pub seed_hash: String,
    /// Provisioner phases by id (`containerd`, `kubeadm-init`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phases: BTreeMap<String, PhaseRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    #[serde(default)]
    pub version: u32,
    pub lab: String,
    /// Name of the storage pool klab is creating or created for this lab; recorded before the
    /// pool is defined, so a pool left untagged by a crash can be claimed by the next `up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeRecord>,
}

impl Journal {
    pub fn new(lab: &str) -> Self {
        Self {
            version: JOURNAL_VERSION,
            lab: lab.to_string(),
            pool: None,
            nodes: BTreeMap::new(),
        }
    }

    /// Record that `node` reached `step` with `seed_hash`. A new seed hash starts the record over
    /// (its earlier steps were for another seed); phases survive only for the same seed.
    pub fn reach(&mut self, node: &str, step: Step, seed_hash: &str) {
        match self.nodes.get_mut(node) {
            Some(r) if r.seed_hash == seed_hash => r.step = step,
            _ => {
                self.nodes.insert(
                    node.to_string(),
                    NodeRecord {
                        step,
                        seed_hash: seed_hash.to_string(),
                        phases: BTreeMap::new(),
                    },
                );
            }
        }
    }

    /// Forget a node's progress (it is being rebuilt, or it left the lab).
    pub fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    /// True when `node` was verified with exactly this seed.
    pub fn verified(&self, node: &str, seed_hash: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|r| r.step == Step::Verified && r.seed_hash == seed_hash)
    }

    /// Step back a verified node to `Started`: its domain is running but must be checked again
    /// (e.g. its network was restarted under it).
    pub fn unverify(&mut self, node: &str) {
        if let Some(r) = self.nodes.get_mut(node)
            && r.step > Step::Started
        {
            r.step = Step::Started;
        }
    }

    /// True when this journal says klab itself set out to create `pool`.
    pub fn created_pool(&self, pool: &str) -> bool {
        self.pool.as_deref() == Some(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_seed_restarts_the_record_and_only_the_same_seed_counts_as_verified() {
        let mut j = Journal::new("demo");
        j.reach("a", Step::Overlay, "h1");
        j.reach("a", Step::Verified, "h1");
        assert!(j.verified("a", "h1"));
        assert!(!j.verified("a", "h2"));
        j.reach("a", Step::Seed, "h2");
        assert_eq!(j.nodes["a"].step, Step::Seed);
        assert!(!j.verified("a", "h1"));
        j.unverify("a");
        assert_eq!(j.nodes["a"].step, Step::Seed);
        j.reach("a", Step::Verified, "h2");
        j.unverify("a");
        assert_eq!(j.nodes["a"].step, Step::Started);
    }

    #[test]
    fn reads_a_literal_version_1_file_and_an_unversioned_one() {
        let v1 = r#"{"version":1,"lab":"demo","pool":"klab-demo",
            "nodes":{"a":{"step":"cloud-init","seed_hash":"ab12",
            "phases":{"containerd":{"status":"done"}}}}}"#;
        let j: Journal = serde_json::from_str(v1).unwrap();
        assert_eq!(j.version, 1);
        assert!(j.created_pool("klab-demo"));
        assert_eq!(j.nodes["a"].step, Step::CloudInit);
        assert_eq!(j.nodes["a"].phases["containerd"].status, "done");
        let v0: Journal = serde_json::from_str(r#"{"lab":"demo"}"#).unwrap();
        assert_eq!(v0.version, 0);
        assert!(v0.nodes.is_empty());
        assert!(!v0.created_pool("klab-demo"));
    }

    #[test]
    fn serializes_with_its_version() {
        let mut j = Journal::new("demo");
        j.reach("a", Step::Defined, "ff");
        assert_eq!(
            serde_json::to_string(&j).unwrap(),
            r#"{"version":1,"lab":"demo","nodes":{"a":{"step":"defined","seed_hash":"ff"}}}"#
        );
    }
}
