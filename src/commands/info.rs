//! `klab status` and `klab list`: what exists, from state and from the hypervisor's tags.

use std::collections::BTreeMap;

use serde_json::json;

use super::CmdError;
use crate::cli::GlobalArgs;
use crate::observed::DomainState;
use crate::output::Printer;
use crate::state::StateDir;

pub async fn status(p: &Printer, g: &GlobalArgs, lab: String) -> Result<(), CmdError> {
    let st = crate::usecase::status::status(&super::env(p), &lab, g.connect.as_deref()).await?;
    if p.is_json() {
        p.json(&json!({ "lab": st.lab, "uri": st.uri, "accelerator": st.accelerator, "networks": st.networks, "nodes": st.nodes, "kubernetes": st.kubernetes }));
        return Ok(());
    }
    p.line(format!(
        "lab {} on {} (accelerator {})",
        st.lab, st.uri, st.accelerator
    ));
    for n in &st.networks {
        p.line(format!("  network {n}"));
    }
    for n in &st.nodes {
        p.line(format!(
            "  {:<12} {:<8} ssh {:<15} {}",
            n.name,
            n.state,
            n.ssh,
            n.addresses.join(" ")
        ));
    }
    if let Some(k) = &st.kubernetes {
        p.line(format!(
            "  kubernetes {} endpoint {}{}",
            k.version
                .as_deref()
                .map(|v| format!("v{v}"))
                .unwrap_or_else(|| "(version not resolved yet)".into()),
            k.endpoint,
            k.kubeconfig
                .as_deref()
                .map(|c| format!(" kubeconfig {c}"))
                .unwrap_or_default()
        ));
        if let Some(vip) = &k.vip {
            p.line(format!(
                "  vip {vip} held by {}",
                k.vip_holder
                    .as_deref()
                    .unwrap_or("nobody (no control plane answers for it)")
            ));
        }
        for (n, s) in &k.nodes {
            p.line(format!("  {n:<12} {s}"));
        }
    }
    Ok(())
}

pub async fn list(p: &Printer, g: &GlobalArgs) -> Result<(), CmdError> {
    let root = crate::paths::state_root();
    let mut labs: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for lab in crate::state::list_labs(&root)? {
        let st = StateDir::new(&root, &lab);
        // A damaged state file shows as unknown, never hides the other labs.
        let meta = st.load_meta().ok().flatten();
        let nodes = st.load_down_facts().map(|s| s.nodes.len()).unwrap_or(0);
        // The plan's networks, for a lab the registry does not know (yet, or any more).
        let networks: Vec<String> = st
            .load_plan()
            .ok()
            .flatten()
            .map(|p| {
                p.networks
                    .iter()
                    .map(|n| format!("{}={}/{}", n.key, n.address, n.prefix))
                    .collect()
            })
            .unwrap_or_default();
        labs.insert(
            lab.clone(),
            json!({ "lab": lab, "uri": meta.as_ref().map(|m| m.uri.clone()), "nodes": nodes, "state": true, "domains_running": null, "networks": networks }),
        );
    }
    // Also labs that only exist as tagged objects (e.g. state removed by hand).
    let uri = g
        .connect
        .clone()
        .unwrap_or_else(|| super::DEFAULT_URI.to_string());
    let env = super::env(p);
    if let Ok(backend) = env.connect(&uri).await
        && let Ok(observed) = env
            .call(&backend, "list objects klab-*", |b| b.observe("klab-"))
            .await
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
    // Networks and copy relations from the host-wide registry.
    let registry = crate::registry::Registry::new(&crate::paths::data_root())
        .read()
        .unwrap_or_default();
    for (name, e) in &registry.labs {
        let entry = labs
            .entry(name.clone())
            .or_insert_with(|| json!({ "lab": name, "uri": null, "nodes": null, "state": false }));
        entry["networks"] = json!(
            e.networks
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
        );
        if let Some(of) = &e.copy_of {
            entry["copy_of"] = json!(of);
            entry["copy"] = json!(e.copy);
        }
    }
    group_copies(&mut labs);
    if p.is_json() {
        p.json(&labs.values().collect::<Vec<_>>());
        return Ok(());
    }
    if labs.is_empty() {
        p.line("no labs on this host");
    }
    // Copies under their lab (also when the lab itself is not up).
    let mut order: Vec<(String, Option<String>)> = Vec::new();
    for (name, v) in &labs {
        match v["copy_of"].as_str() {
            Some(of) => order.push((of.to_string(), Some(name.clone()))),
            None => order.push((name.clone(), None)),
        }
    }
    order.sort();
    let mut shown_parent = std::collections::BTreeSet::new();
    for (parent, copy) in order {
        let Some(copy) = copy else {
            shown_parent.insert(parent.clone());
            line(p, &labs[&parent], "");
            continue;
        };
        if shown_parent.insert(parent.clone()) {
            p.line(format!("{parent:<20} (copies only)"));
        }
        line(p, &labs[&copy], "  ");
    }
    Ok(())
}

/// PURE: the same keys on every entry of `klab list --output json` (`copy_of`/`copy` null for a
/// lab that is no copy, `networks` empty when unknown), and on each lab the names of its copies
/// (`copies`), so scripts can read the flat list or the grouping.
fn group_copies(labs: &mut BTreeMap<String, serde_json::Value>) {
    let mut copies: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, v) in labs.iter_mut() {
        for key in ["copy_of", "copy"] {
            if v.get(key).is_none() {
                v[key] = serde_json::Value::Null;
            }
        }
        if v.get("networks").is_none() {
            v["networks"] = json!([]);
        }
        if let Some(of) = v["copy_of"].as_str() {
            copies.entry(of.to_string()).or_default().push(name.clone());
        }
    }
    for (name, v) in labs.iter_mut() {
        v["copies"] = json!(copies.remove(name).unwrap_or_default());
    }
}

fn line(p: &Printer, v: &serde_json::Value, indent: &str) {
    {
        p.line(format!(
            "{indent}{:<20} nodes {:<3} running {:<3} {}{}{}",
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
            v["networks"]
                .as_array()
                .filter(|n| !n.is_empty())
                .map(|n| format!(
                    " {}",
                    n.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
                .unwrap_or_default(),
            if v["state"].as_bool() == Some(false) {
                "  (no state dir: remove with `klab down NAME`)"
            } else {
                ""
            }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_has_the_copy_keys_and_a_lab_names_its_copies() {
        let mut labs = BTreeMap::new();
        labs.insert(
            "demo".to_string(),
            json!({ "lab": "demo", "networks": ["lan=10.0.0.0/24"] }),
        );
        labs.insert(
            "demo-1".to_string(),
            json!({ "lab": "demo-1", "copy_of": "demo", "copy": "1", "networks": ["lan=10.240.7.0/24"] }),
        );
        // A copy whose lab is not up: still listed flat, with its relation.
        labs.insert(
            "web-a".to_string(),
            json!({ "lab": "web-a", "copy_of": "web", "copy": "a", "networks": [] }),
        );
        labs.insert("bare".to_string(), json!({ "lab": "bare" }));
        group_copies(&mut labs);
        assert_eq!(labs["demo"]["copies"], json!(["demo-1"]));
        assert_eq!(labs["demo"]["copy_of"], serde_json::Value::Null);
        assert_eq!(labs["demo-1"]["copy_of"], "demo");
        assert_eq!(labs["demo-1"]["networks"], json!(["lan=10.240.7.0/24"]));
        assert_eq!(labs["demo-1"]["copies"], json!([]));
        assert_eq!(labs["web-a"]["copy_of"], "web");
        assert_eq!(labs["bare"]["networks"], json!([]));
        assert_eq!(labs["bare"]["copy"], serde_json::Value::Null);
    }
}
