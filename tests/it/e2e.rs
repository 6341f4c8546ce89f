//! Real end-to-end: `klab up` / `klab down` with libvirt + QEMU (TCG) on isolated networks.
//!
//! Ignored by default (`cargo test -- --include-ignored` runs it; scripts/test.sh does, after
//! `klab image build debian-12`); needs root with libvirtd running. Everything it creates is on bridges the test's own lab defines;
//! no traffic leaves the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const URI: &str = "qemu:///system";

pub(crate) fn klab(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_klab"))
        .args(args)
        .env("KLAB_CONNECT", URI)
        .env("KLAB_ACCEL", "qemu")
        .output()
        .expect("run klab");
    eprintln!(
        "$ klab {}\n--- stdout\n{}--- stderr\n{}--- status {:?}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    out
}

pub(crate) fn ok(args: &[&str]) -> String {
    let out = klab(args);
    assert!(out.status.success(), "klab {} failed", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("run virsh")
}

pub(crate) fn virsh_names(args: &[&str]) -> Vec<String> {
    String::from_utf8_lossy(&virsh(args).stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Look-alike objects without klab's tag: `down` must leave them, `up` must not adopt them.
struct Foreign {
    domain: String,
    network: String,
}

impl Foreign {
    fn create(lab: &str, dir: &Path) -> Self {
        let network = format!("klab-{lab}-lookalike");
        let domain = format!("klab-{lab}-impostor");
        let net_xml = dir.join("net.xml");
        std::fs::write(
            &net_xml,
            format!("<network><name>{network}</name><bridge name='kltest-la0'/></network>"),
        )
        .unwrap();
        assert!(
            virsh(&["net-define", net_xml.to_str().unwrap()])
                .status
                .success()
        );
        let dom_xml = dir.join("dom.xml");
        std::fs::write(
            &dom_xml,
            format!(
                "<domain type='qemu'><name>{domain}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
                 <os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
            ),
        )
        .unwrap();
        assert!(
            virsh(&["define", dom_xml.to_str().unwrap()])
                .status
                .success()
        );
        Self { domain, network }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = virsh(&["undefine", &self.domain]);
        let _ = virsh(&["net-undefine", &self.network]);
    }
}

#[test]
#[ignore = "needs libvirt qemu:///system and the test guest image"]
fn up_reconcile_and_down_on_real_qemu() {
    let lab_file = repo().join("labs/e2e-isolated.toml");
    let lab_path = lab_file.to_str().unwrap();
    let text = std::fs::read_to_string(&lab_file).unwrap();
    let lab = klab::config::parse_str(&text, "labs/e2e-isolated.toml").expect("e2e lab is valid");
    let inputs = klab::plan::PlanInputs {
        accel: klab::model::Accel::Qemu,
        uri: URI.into(),
        pool_dir: klab::paths::pool_dir(&lab.name).display().to_string(),
        image_cache: klab::paths::image_cache().display().to_string(),
        console_dir: klab::paths::console_dir().display().to_string(),
        keys: None,
        local_images: vec![],
    };
    let plan = klab::plan::plan(&lab, &inputs);
    let name = lab.name.clone();
    // Leftovers of an aborted earlier run must not decide this one.
    let _ = klab(&["down", &name]);
    // Nor may this run's leftovers, after a failure, decide the next test's.
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = klab(&["down", &self.0]);
        }
    }
    let _down = Down(name.clone());

    let tmp = tempfile::tempdir().unwrap();
    let foreign = Foreign::create(&name, tmp.path());

    // 1. up: every node reaches SSH with its pinned key, finishes cloud-init, verifies its NICs.
    let out = klab(&["up", lab_path, "--output", "json"]);
    assert!(out.status.success(), "klab up failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["changed"], true);
    assert_eq!(report["accelerator"], "qemu");
    assert_eq!(report["nodes"].as_array().unwrap().len(), plan.nodes.len());
    super::modes::assert_private_modes(
        &klab::paths::pool_dir(&name),
        &klab::paths::state_root().join(&name),
    );

    // 2. From inside every guest: hostname, static addresses, the one default route, the host key.
    let state = klab::paths::state_root().join(&name);
    for node in &plan.nodes {
        let hostname = ok(&["ssh", &format!("{name}/{}", node.name), "--", "hostname"]);
        assert_eq!(hostname.trim(), node.name);
        let addrs = ok(&[
            "ssh",
            &format!("{name}/{}", node.name),
            "--",
            "ip",
            "-o",
            "-4",
            "addr",
            "show",
        ]);
        for nic in &node.nics {
            let want = format!("{}    inet {}/{}", nic.ifname, nic.ip, nic.prefix);
            assert!(
                addrs.contains(&want),
                "{}: missing `{want}` in\n{addrs}",
                node.name
            );
        }
        let routes = ok(&[
            "ssh",
            &format!("{name}/{}", node.name),
            "--",
            "ip",
            "-4",
            "route",
            "show",
            "default",
        ]);
        let lines: Vec<&str> = routes.lines().filter(|l| !l.trim().is_empty()).collect();
        let nic1 = &node.nics[0];
        assert_eq!(
            lines.len(),
            1,
            "{}: exactly one default route, got {routes}",
            node.name
        );
        assert!(
            lines[0].starts_with(&format!(
                "default via {} dev {}",
                nic1.gateway.unwrap(),
                nic1.ifname
            )),
            "{}: default route must leave through NIC 1: {routes}",
            node.name
        );
        let target = format!("{name}/{}", node.name);
        let presented = ok(&[
            "ssh",
            &target,
            "--",
            "sudo",
            "cat",
            "/etc/ssh/ssh_host_ed25519_key.pub",
        ]);
        let host_keys = ok(&[
            "ssh",
            &target,
            "--",
            // One string, as with OpenSSH: the remote shell parses it (the glob runs as root).
            "sudo sh -c 'ls /etc/ssh/ssh_host_*_key'",
        ]);
        assert_eq!(
            host_keys.trim(),
            "/etc/ssh/ssh_host_ed25519_key",
            "{}: the injected host key is the only one",
            node.name
        );
        let pinned =
            std::fs::read_to_string(state.join("hostkeys").join(format!("{}.pub", node.name)))
                .unwrap();
        let key_data = |s: &str| s.split_whitespace().nth(1).unwrap_or_default().to_string();
        assert_eq!(
            key_data(&presented),
            key_data(&pinned),
            "{}: host key is the generated one",
            node.name
        );
    }

    // 3. A second up changes nothing.
    let out = klab(&["up", lab_path, "--output", "json"]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["changed"], false, "second up must be a no-op");

    // 4. A domain deleted by hand is recreated, and only that one.
    let victim = &plan.nodes[1];
    assert!(virsh(&["destroy", &victim.domain]).status.success());
    assert!(virsh(&["undefine", &victim.domain]).status.success());
    let dry = ok(&["up", lab_path, "--dry-run", "--output", "json"]);
    let dry: serde_json::Value = serde_json::from_str(&dry).unwrap();
    let created: Vec<&str> = dry["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "create-node")
        .map(|a| a["node"].as_str().unwrap())
        .collect();
    assert_eq!(created, vec![victim.name.as_str()]);
    let out = klab(&["up", lab_path, "--output", "json"]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let recreated: Vec<&str> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["report"]["created"] == true)
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(recreated, vec![victim.name.as_str()]);

    // 5. down removes everything of the lab and nothing else; a second down is a no-op.
    let out = ok(&["down", &name]);
    assert!(
        out.contains(&format!("left domain {}", foreign.domain)),
        "{out}"
    );
    assert!(
        out.contains(&format!("left network {}", foreign.network)),
        "{out}"
    );
    let prefix = format!("klab-{name}-");
    let domains = virsh_names(&["list", "--all", "--name"]);
    assert_eq!(
        domains
            .iter()
            .filter(|d| d.starts_with(&prefix))
            .collect::<Vec<_>>(),
        vec![&foreign.domain]
    );
    let nets = virsh_names(&["net-list", "--all", "--name"]);
    assert_eq!(
        nets.iter()
            .filter(|n| n.starts_with(&prefix))
            .collect::<Vec<_>>(),
        vec![&foreign.network]
    );
    let pools = virsh_names(&["pool-list", "--all", "--name"]);
    assert!(
        !pools.contains(&format!("klab-{name}")),
        "pool left: {pools:?}"
    );
    assert!(!state.exists(), "state dir removed");
    let again = ok(&["down", &name]);
    assert!(again.contains("nothing to remove"), "{again}");
}
