//! Provisioning steps: the one-line-per-phase summary of [`super::provision`] that `klab plan`
//! prints and older callers read (id, nodes, one at a time or not).

use super::provision::{ProvisionPlan, Schedule};
use super::types::ProvisionStep;

/// One step per phase, in execution order.
pub fn summary(p: &ProvisionPlan) -> Vec<ProvisionStep> {
    p.phases
        .iter()
        .map(|ph| ProvisionStep {
            id: ph.id.as_str().to_string(),
            nodes: ph.nodes.iter().map(|n| n.node.clone()).collect(),
            serial: ph.schedule == Schedule::Serial,
            description: ph.about.clone(),
        })
        .collect()
}
