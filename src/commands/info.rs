//! `klab status` and `klab list`: what exists, from state and from the hypervisor's tags.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use super::{CmdError, resolve_lab_name};
use crate::cli::GlobalArgs;
use crate::exec::call;
use crate::observed::DomainState;
use crate::output::Printer;
use crate::state::StateDir;

#[derive(Debug, Serialize)]
struct NodeStatus {
    name: String,
    domain: String,
    state: String,
    ssh: String,
    addresses: Vec<String>,
}

pub async fn status(
    p: &Printer,
    g: &GlobalArgs,
    name: Option<String>,
    file: Option<std::path::PathBuf>,
) -> Result<(), CmdError> {
    let lab = resolve_lab_name(name, file)?;
    let state = StateDir::new(&crate::paths::state_root(), &lab);
    let super::ExistingLab {
        uri,
        meta,
        saved,
        observed,
        ..
    } = super::find_lab(g, &state).await?;
    let doms: BTreeMap<String, DomainState> = observed
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
    let networks: Vec<String> = observed
        .networks
        .iter()
        .filter(|n| n.owner.as_ref().is_some_and(|t| t.lab == lab))
        .map(|n| format!("{}{}", n.name, if n.active { "" } else { " (inactive)" }))
        .collect();
    if saved.is_none() && doms.is_empty() && networks.is_empty() {
        return Err(CmdError::user(
            format!("no lab named `{lab}` on {uri}"),
            "`klab list` shows the labs on this host",
        ));
    }
    let mut nodes = Vec::new();
    if let Some(s) = &saved {
        for n in &s.nodes {
            let state = doms
                .get(&n.name)
                .map(|st| format!("{st:?}").to_lowercase())
                .unwrap_or_else(|| "missing".into());
            let addresses = n
                .nics
                .iter()
                .map(|nic| format!("{}={}", nic.ifname, nic.ip))
                .collect();
            nodes.push(NodeStatus {
                name: n.name.clone(),
                domain: n.domain.clone(),
                state,
                ssh: n.ssh_address.to_string(),
                addresses,
            });
        }
    } else {
        for (n, st) in &doms {
            nodes.push(NodeStatus {
                name: n.clone(),
                domain: format!("klab-{lab}-{n}"),
                state: format!("{st:?}").to_lowercase(),
                ssh: String::new(),
                addresses: vec![],
            });
        }
    }
    let accel = meta.as_ref().map(|m| m.accel.clone()).unwrap_or_default();
    if p.is_json() {
        p.json(&json!({ "lab": lab, "uri": uri, "accelerator": accel, "networks": networks, "nodes": nodes }));
        return Ok(());
    }
    p.line(format!("lab {lab} on {uri} (accelerator {accel})"));
    for n in &networks {
        p.line(format!("  network {n}"));
    }
    for n in &nodes {
        p.line(format!(
            "  {:<12} {:<8} ssh {:<15} {}",
            n.name,
            n.state,
            n.ssh,
            n.addresses.join(" ")
        ));
    }
    Ok(())
}

pub async fn list(p: &Printer, g: &GlobalArgs) -> Result<(), CmdError> {
    let root = crate::paths::state_root();
    let mut labs: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for lab in crate::state::list_labs(&root)? {
        let st = StateDir::new(&root, &lab);
        let meta = st.load_meta()?;
        let nodes = st.load_plan()?.map(|s| s.nodes.len()).unwrap_or(0);
        labs.insert(
            lab.clone(),
            json!({ "lab": lab, "uri": meta.as_ref().map(|m| m.uri.clone()), "nodes": nodes, "state": true, "domains_running": null }),
        );
    }
    // Also labs that only exist as tagged objects (e.g. state removed by hand).
    let uri = g
        .connect
        .clone()
        .unwrap_or_else(|| super::DEFAULT_URI.to_string());
    if let Ok(backend) = super::up::connect(&uri).await
        && let Ok(observed) = call(&backend, |b| b.observe("klab-")).await
    {
        let mut running: BTreeMap<String, usize> = BTreeMap::new();
        for d in &observed.domains {
            if let Some(t) = &d.owner {
                let e = running.entry(t.lab.clone()).or_default();
                if d.state == DomainState::Running {
                    *e += 1;
                }
            }
        }
        for n in &observed.networks {
            if let Some(t) = &n.owner {
                running.entry(t.lab.clone()).or_default();
            }
        }
        for (lab, count) in running {
            let entry = labs.entry(lab.clone()).or_insert_with(
                || json!({ "lab": lab, "uri": uri, "nodes": null, "state": false }),
            );
            entry["domains_running"] = json!(count);
        }
    }
    if p.is_json() {
        p.json(&labs.values().collect::<Vec<_>>());
        return Ok(());
    }
    if labs.is_empty() {
        p.line("no labs on this host");
    }
    for v in labs.values() {
        p.line(format!(
            "{:<20} nodes {:<3} running {:<3} {}{}",
            v["lab"].as_str().unwrap_or(""),
            v["nodes"]
                .as_u64()
                .map(|n| n.to_string())
                .unwrap_or("?".into()),
            v["domains_running"]
                .as_u64()
                .map(|n| n.to_string())
                .unwrap_or("?".into()),
            v["uri"].as_str().unwrap_or(""),
            if v["state"].as_bool() == Some(false) {
                "  (no state dir: remove with `klab down NAME`)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}
