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
    pub kubernetes: Option<KubeStatus>,
}

/// The cluster as klab's journal and the host see it (no SSH: status stays cheap).
#[derive(Debug, Serialize)]
pub struct KubeStatus {
    pub version: Option<String>,
    pub endpoint: String,
    pub kubeconfig: Option<String>,
    /// Per node: the last phase the journal has finished, or `provisioned`.
    pub nodes: BTreeMap<String, String>,
    pub vip: Option<String>,
    /// The control plane whose MAC answers for the VIP in the host's ARP table (local labs whose
    /// host has an address on the cluster network); `None` when nobody answers.
    pub vip_holder: Option<String>,
}

/// What the journal says about each Kubernetes node, and who holds the VIP.
async fn kube_status(
    state: &crate::state::StateDir,
    plan: &crate::plan::LabPlan,
    local: bool,
    host: &super::host::HostFs,
) -> Option<KubeStatus> {
    let k = plan.kubernetes.as_ref()?;
    let journal = state.load_journal().ok().flatten();
    let mut nodes = BTreeMap::new();
    for name in k.control_planes.iter().chain(&k.workers) {
        let done: Vec<&str> = k
            .provision
            .phases
            .iter()
            .filter(|ph| ph.node(name).is_some())
            .filter(|ph| {
                journal
                    .as_ref()
                    .and_then(|j| j.nodes.get(name))
                    .and_then(|r| r.phases.get(ph.id.as_str()))
                    .is_some_and(|p| p.status == "done")
            })
            .map(|ph| ph.id.as_str())
            .collect();
        let all = k
            .provision
            .phases
            .iter()
            .filter(|ph| ph.node(name).is_some())
            .count();
        let word = match done.last() {
            _ if all > 0 && done.len() == all => "provisioned".to_string(),
            Some(last) => format!("provisioning (finished {last})"),
            None => "not provisioned".to_string(),
        };
        nodes.insert(name.clone(), word);
    }
    let recorded: Option<serde_json::Value> = state
        .read_file(super::provision::VALUES_FILE)
        .ok()
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok());
    let version = k.patch_version.clone().or_else(|| {
        recorded
            .as_ref()
            .and_then(|v| v["cluster"]["kubernetes-version"].as_str())
            .map(str::to_string)
    });
    let mut vip_holder = None;
    if let (Some(vip), true) = (k.control_plane_vip, local) {
        // Touch the VIP so the host's ARP entry is current, then name the node with that MAC.
        let _ = tokio::task::spawn_blocking(move || {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from((vip, crate::plan::API_PORT)),
                std::time::Duration::from_secs(1),
            )
        })
        .await;
        vip_holder = host.arp_mac(vip).and_then(|mac| {
            plan.nodes
                .iter()
                .find(|n| n.nics.iter().any(|nic| nic.mac.eq_ignore_ascii_case(&mac)))
                .map(|n| n.name.clone())
        });
    }
    let kc = state.path().join(super::provision::KUBECONFIG_FILE);
    Some(KubeStatus {
        version,
        endpoint: k.control_plane_endpoint.clone(),
        kubeconfig: kc.exists().then(|| kc.display().to_string()),
        nodes,
        vip: k.control_plane_vip.map(|v| v.to_string()),
        vip_holder,
    })
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
    let local = env.host_checks && found.uri.starts_with("qemu:///");
    let kubernetes = match &found.saved {
        Some(plan) => kube_status(&state, plan, local, &Default::default()).await,
        None => None,
    };
    Ok(StatusOutcome {
        kubernetes,
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
