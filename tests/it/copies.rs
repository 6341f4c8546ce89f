//! Real copies under QEMU/TCG (`cargo test --test it copies_ -- --include-ignored`): three copies of
//! a one-node lab come up together from one lab file with their own subnets, bridges, MACs and
//! keys; a copy's node reaches its own gateway and not another copy's node; `down` of one copy
//! leaves the others running and frees its subnets.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::e2e::{klab, ok};

const LAB: &str = "e2ecp";

struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = klab(&["down", LAB, "--all-copies"]);
    }
}

fn registry() -> serde_json::Value {
    let p = klab::paths::data_root().join("registry.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|_| "{}".into())).unwrap()
}

#[test]
#[ignore = "needs libvirt qemu:///system and the test guest image"]
fn copies_come_up_together_apart_and_go_alone() {
    let lab_file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("labs/e2e-copies.toml");
    let lab_path = lab_file.to_str().unwrap();
    let _ = klab(&["down", LAB, "--all-copies"]);
    let _down = Down;

    let out = klab(&["up", lab_path, "--copies", "3", "--output", "json"]);
    assert!(out.status.success(), "klab up --copies 3 failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let copies = report["copies"].as_array().expect("copies");
    assert_eq!(copies.len(), 3, "{report}");
    let pool: ipnetwork::Ipv4Network = klab::copies::DEFAULT_POOL.parse().unwrap();

    let (mut subnets, mut bridges, mut macs) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut nodes = Vec::new();
    for (i, c) in copies.iter().enumerate() {
        let name = format!("{LAB}-{}", i + 1);
        assert_eq!(c["lab"], name.as_str());
        for n in c["networks"].as_array().unwrap() {
            let cidr: ipnetwork::Ipv4Network = n["cidr"].as_str().unwrap().parse().unwrap();
            assert!(pool.contains(cidr.network()), "{cidr} outside the pool");
            assert!(subnets.insert(cidr), "{cidr} used twice");
            assert!(bridges.insert(n["bridge"].as_str().unwrap().to_string()));
        }
        let plan: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(klab::paths::state_root().join(&name).join("plan.json"))
                .unwrap(),
        )
        .unwrap();
        let node = &plan["nodes"][0];
        for nic in node["nics"].as_array().unwrap() {
            assert!(macs.insert(nic["mac"].as_str().unwrap().to_string()));
            // The host part of the lab file's address is kept.
            assert!(nic["ip"].as_str().unwrap().ends_with(".10"), "{nic}");
        }
        let ssh: String = node["ssh_address"].as_str().unwrap().to_string();
        let gw = node["nics"][0]["gateway"].as_str().unwrap().to_string();
        nodes.push((name, ssh, gw));
    }

    // Each node has its copy's addresses, reaches its own gateway and no other copy's node.
    for (i, (name, ssh, gw)) in nodes.iter().enumerate() {
        let addrs = ok(&[
            "ssh",
            &format!("{name}/vm"),
            "--",
            "ip -o -4 addr show dev ext0",
        ]);
        assert!(addrs.contains(&format!(" {ssh}/24 ")), "{name}: {addrs}");
        let neigh = ok(&[
            "ssh",
            &format!("{name}/vm"),
            "--",
            &format!("timeout 3 bash -c '</dev/tcp/{gw}/1' 2>/dev/null; ip neigh show {gw}"),
        ]);
        assert!(
            neigh.contains("lladdr"),
            "{name}: own gateway {gw} not reachable: {neigh}"
        );
        let other = &nodes[(i + 1) % nodes.len()].1;
        let probe = klab(&[
            "ssh",
            &format!("{name}/vm"),
            "--",
            &format!("timeout 4 bash -c '</dev/tcp/{other}/22'"),
        ]);
        assert!(
            !probe.status.success(),
            "{name} reached another copy's node {other}"
        );
    }
    let reg = registry();
    for (name, _, _) in &nodes {
        assert_eq!(reg["labs"][name]["copy_of"], LAB, "{reg}");
    }
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", "--output", "json"])).unwrap();
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["copy_of"] == LAB)
        .map(|l| l["lab"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["e2ecp-1", "e2ecp-2", "e2ecp-3"]);

    // Down of copy 2 alone: the others keep running, its subnets are free again.
    ok(&["down", LAB, "--copy", "2"]);
    for c in ["1", "3"] {
        let st: serde_json::Value =
            serde_json::from_str(&ok(&["status", LAB, "--copy", c, "--output", "json"])).unwrap();
        assert_eq!(st["nodes"][0]["state"], "running", "copy {c}: {st}");
    }
    assert!(registry()["labs"].get("e2ecp-2").is_none());
    // Up again: the same subnets as before for the copies that stayed.
    let again = klab(&["up", lab_path, "--copy", "1", "--output", "json"]);
    assert!(again.status.success());
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["copies"][0]["changed"], false);
    assert_eq!(again["copies"][0]["networks"], copies[0]["networks"]);

    ok(&["down", LAB, "--all-copies"]);
    assert!(
        registry()["labs"]
            .as_object()
            .is_none_or(|m| !m.keys().any(|k| k.starts_with("e2ecp-")))
    );
}

// ---- The host registry on the fake backend (no VMs) ----

mod registry_on_the_fake {
    use std::sync::Arc;

    use klab::backend::fake::FakeBackend;
    use klab::backend::{Backend, BackendError};

    use super::super::snapshot::fake_lab;

    #[tokio::test]
    async fn copies_a_failed_up_that_created_nothing_releases_its_subnets() {
        // The hypervisor cannot be reached: nothing is created.
        let w = fake_lab::with_connector(
            FakeBackend::new(),
            Arc::new(|uri: &str| -> Result<Arc<dyn Backend>, BackendError> {
                Err(BackendError::Connect {
                    uri: uri.into(),
                    message: "refused".into(),
                })
            }),
        );
        let err = klab::usecase::up::up(&w.env, w.request(Some("1"), &[]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        assert!(
            !w.registry().labs.contains_key("e2e-1"),
            "{:?}",
            w.registry()
        );
        assert!(!w.env.paths.state_root.join("e2e-1").exists());
    }

    #[tokio::test]
    async fn copies_a_failed_up_that_created_objects_keeps_its_subnets_and_says_so() {
        let w = fake_lab::new();
        // The second node cannot start: the pool, networks and the first node exist.
        w.fake.fail_nth("define_and_start", 2);
        let err = klab::usecase::up::up(&w.env, w.request(Some("1"), &[]))
            .await
            .unwrap_err();
        let hint = err.hint().unwrap_or_default();
        assert!(
            hint.contains("subnets stay reserved on this host until `klab down e2e-1`"),
            "{hint}"
        );
        let entry = &w.registry().labs["e2e-1"];
        assert_eq!(entry.copy_of.as_deref(), Some("e2e"));
        assert_eq!(entry.networks.len(), 2);
        // The next up takes the same subnets and finishes; down releases them.
        let out = klab::usecase::up::up(&w.env, w.request(Some("1"), &[]))
            .await
            .unwrap();
        let klab::usecase::up::UpOutcome::Done { plan, .. } = out else {
            unreachable!()
        };
        let cidrs: Vec<String> = plan
            .networks
            .iter()
            .map(|n| format!("{}/{}", n.address, n.prefix))
            .collect();
        let registered: Vec<String> = entry.networks.iter().map(|(_, n)| n.to_string()).collect();
        assert_eq!(cidrs, registered);
        klab::usecase::down::down(
            &w.env,
            klab::usecase::down::DownRequest {
                lab: "e2e-1".into(),
                connect: None,
                dry_run: false,
                keep_state: false,
            },
        )
        .await
        .unwrap();
        assert!(!w.registry().labs.contains_key("e2e-1"));
    }

    #[tokio::test]
    async fn copies_a_lab_refused_before_it_is_created_leaves_no_registry_entry() {
        // The lab itself (no copy): a failing first up must not hold its subnets either.
        let w = fake_lab::new();
        w.fake.fail_nth("observe", 1);
        assert!(
            klab::usecase::up::up(&w.env, w.request(None, &[]))
                .await
                .is_err()
        );
        assert!(!w.registry().labs.contains_key("e2e"), "{:?}", w.registry());
        // A lab that was registered before keeps its entry through a failed rerun.
        w.up(&[]).await.unwrap();
        w.fake.fail_nth("observe", 3);
        let before = w.registry().labs["e2e"].clone();
        let _ = klab::usecase::up::up(&w.env, w.request(None, &[])).await;
        assert_eq!(w.registry().labs.get("e2e"), Some(&before));
    }
}
