//! `status`: the lab's nodes as the hypervisor shows them, named by its state (or, when that is
//! missing or damaged, by the objects' klab tags).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Env, Error, find_lab};
use crate::observed::DomainState;

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub domain: String,
    pub state: String,
    pub ssh: String,
    pub addresses: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct StatusOutcome {
    pub lab: String,
    pub uri: String,
    pub accelerator: String,
    pub networks: Vec<String>,
    pub nodes: Vec<NodeStatus>,
    /// State files that could not be read.
    pub damaged: Vec<String>,
}

pub async fn status(env: &Env, lab: &str, connect: Option<&str>) -> Result<StatusOutcome, Error> {
    let state = env.paths.state(lab);
    let found = find_lab(env, connect, &state).await?;
    for d in &found.damaged {
        env.printer.note(format!(
            "note: {d}; showing the lab from its objects' klab tags (`klab up <lab file>` rewrites the state, `klab down {lab}` removes the lab)"
        ));
    }
    let doms: BTreeMap<String, DomainState> = found
        .observed
        .domains
        .iter()
        .filter(|d| d.owner.as_ref().is_some_and(|t| t.lab == lab))
        .filter_map(|d| {
            d.owner
                .as_ref()
                .and_then(|t| t.node.clone())
                .map(|n| (n, d.state))
        })
        .collect();
    let networks: Vec<String> = found
        .observed
        .networks
        .iter()
        .filter(|n| n.owner.as_ref().is_some_and(|t| t.lab == lab))
        .map(|n| format!("{}{}", n.name, if n.active { "" } else { " (inactive)" }))
        .collect();
    if found.saved.is_none() && doms.is_empty() && networks.is_empty() {
        return Err(Error::user(
            format!("no lab named `{lab}` on {}", found.uri),
            "`klab list` shows the labs on this host",
        ));
    }
    let show = |st: Option<&DomainState>| {
        st.map(|st| format!("{st:?}").to_lowercase())
            .unwrap_or_else(|| "missing".into())
    };
    let mut nodes = Vec::new();
    if let Some(s) = &found.saved {
        for n in &s.nodes {
            nodes.push(NodeStatus {
                name: n.name.clone(),
                domain: n.domain.clone(),
                state: show(doms.get(&n.name)),
                ssh: n.ssh_address.to_string(),
                addresses: n
                    .nics
                    .iter()
                    .map(|nic| format!("{}={}", nic.ifname, nic.ip))
                    .collect(),
            });
        }
    } else {
        for (n, st) in &doms {
            nodes.push(NodeStatus {
                name: n.clone(),
                domain: format!("klab-{lab}-{n}"),
                state: show(Some(st)),
                ssh: String::new(),
                addresses: vec![],
            });
        }
    }
    Ok(StatusOutcome {
        lab: lab.to_string(),
        uri: found.uri.clone(),
        accelerator: found
            .meta
            .as_ref()
            .map(|m| m.accel.clone())
            .unwrap_or_default(),
        networks,
        nodes,
        damaged: found.damaged,
    })
}
