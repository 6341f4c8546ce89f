//! Crash test under QEMU/TCG: `klab up` (the binary) killed at several points — before its pool
//! is tagged, before a seed uploads, while the node boots, during verification — and each rerun
//! continues; the last one verifies the node. Then the network is destroyed under the running lab
//! and `up` repairs it (network, NIC on the bridge, verification), and `down` after a kill leaves
//! no object of the lab. One node on isolated networks; about one boot plus one reboot.
//!
//! The kill points are `KLAB_TEST_KILL_AT=<point>`: the binary aborts there (no cleanup, no
//! destructors run — to libvirt and the state directory, the same as a SIGKILL).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

const URI: &str = "qemu:///system";
const LAB: &str = "crash";
const LAB_TOML: &str = r#"
name = "crash"

[host]
accel = "qemu"

[defaults]
image = "debian-12"
cpus = 1
memory = "1GiB"
disk = "4GiB"

[networks.net1]
mode = "isolated"
cidr = "10.232.1.0/24"

[networks.net2]
mode = "isolated"
cidr = "10.232.2.0/24"

[[nodes]]
name = "vm1"
nics = [ { network = "net1", ip = "10.232.1.11" }, { network = "net2" } ]

[timeouts]
ssh = "12m"
cloud-init = "12m"
command = "2m"
nodes-ready = "2m"
"#;

fn klab(args: &[&str], kill_at: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_klab"));
    cmd.args(args)
        .env("KLAB_CONNECT", URI)
        .env("KLAB_ACCEL", "qemu")
        .env_remove("KLAB_TEST_KILL_AT");
    if let Some(point) = kill_at {
        cmd.env("KLAB_TEST_KILL_AT", point);
    }
    let out = cmd.output().expect("run klab");
    eprintln!(
        "$ {}klab {}\n--- stdout\n{}--- stderr\n{}--- status {:?}",
        kill_at
            .map(|p| format!("KLAB_TEST_KILL_AT={p} "))
            .unwrap_or_default(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    );
    out
}

/// `klab up` killed at `point`.
fn up_killed_at(lab_file: &str, point: &str, extra: &[&str]) {
    let mut args = vec!["up", lab_file];
    args.extend_from_slice(extra);
    let out = klab(&args, Some(point));
    assert_eq!(
        out.status.signal(),
        Some(6),
        "klab up should have been killed at {point}"
    );
}

fn up_json(lab_file: &str) -> serde_json::Value {
    let out = klab(&["up", lab_file, "--output", "json"], None);
    assert!(out.status.success(), "klab up failed");
    serde_json::from_slice(&out.stdout).expect("up prints JSON")
}

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("run virsh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn names(args: &[&str]) -> Vec<String> {
    virsh(args)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| l.starts_with(&format!("klab-{LAB}")))
        .collect()
}

fn journal_step(node: &str) -> Option<String> {
    let path = klab::paths::state_root().join(LAB).join("journal.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    j["nodes"][node]["step"].as_str().map(str::to_string)
}

fn verified(report: &serde_json::Value) -> bool {
    report["nodes"][0]["report"]["ready_seconds"].is_number()
}

#[test]
#[ignore = "needs libvirt qemu:///system and the test guest image"]
fn up_killed_anywhere_converges_and_down_after_a_kill_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lab_path = tmp.path().join("crash.toml");
    std::fs::write(&lab_path, LAB_TOML).unwrap();
    let lab_file = lab_path.to_str().unwrap();
    let lab = klab::config::parse_str(LAB_TOML, "crash.toml").unwrap();
    let plan = klab::plan::plan(
        &lab,
        &klab::plan::PlanInputs {
            accel: klab::model::Accel::Qemu,
            uri: URI.into(),
            pool_dir: klab::paths::pool_dir(LAB).display().to_string(),
            image_cache: klab::paths::image_cache().display().to_string(),
            console_dir: klab::paths::console_dir().display().to_string(),
            keys: None,
            local_images: vec![],
        },
    );
    let node = &plan.nodes[0];
    let pool = plan.pool.name.clone();
    let _ = klab(&["down", LAB], None);
    // A failure must not leave the lab running: the next test's lab uses the same subnets.
    struct Down;
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = klab(&["down", LAB], None);
        }
    }
    let _down = Down;

    // 1. Killed after the pool was defined, before it was tagged: the next run claims it.
    up_killed_at(lab_file, "pool-untagged", &[]);
    assert_eq!(names(&["pool-list", "--all", "--name"]), vec![pool.clone()]);
    assert!(
        !virsh(&["vol-list", &pool]).contains(".tag"),
        "the pool must still be untagged"
    );

    // 2. Killed before the seed upload (overlay made); 3. while the node boots.
    up_killed_at(lab_file, "seed-upload", &[]);
    assert!(virsh(&["vol-list", &pool]).contains(&format!("klab-owner-{LAB}.tag")));
    assert_eq!(journal_step("vm1").as_deref(), Some("overlay"));
    up_killed_at(lab_file, "booting", &[]);
    assert_eq!(
        names(&["list", "--name"]),
        vec![node.domain.clone()],
        "the domain runs"
    );
    assert_eq!(journal_step("vm1").as_deref(), Some("started"));

    // 4. During verification: the rerun waits through the boot and cloud-init, then is killed.
    up_killed_at(lab_file, "verifying", &[]);
    assert_eq!(journal_step("vm1").as_deref(), Some("cloud-init"));

    // 5. A running but unverified node is NOT up to date: this run verifies it.
    let report = up_json(lab_file);
    assert_eq!(report["changed"], true, "{report}");
    assert!(verified(&report), "{report}");
    assert_eq!(journal_step("vm1").as_deref(), Some("verified"));
    let report = up_json(lab_file);
    assert_eq!(report["changed"], false, "{report}");

    // 6. The network destroyed under the running lab: up restarts it, gets the NIC back on its
    //    bridge (by restarting the node) and verifies the node again.
    let net1 = &plan.networks[0];
    virsh(&["net-destroy", &net1.name]);
    let report = up_json(lab_file);
    assert_eq!(report["changed"], true, "{report}");
    assert!(verified(&report), "{report}");
    let members = std::fs::read_dir(Path::new("/sys/class/net").join(&net1.bridge).join("brif"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(members >= 1, "bridge {} has no members", net1.bridge);
    let out = klab(&["ssh", &format!("{LAB}/vm1"), "--", "hostname"], None);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vm1");

    // 6b. A hard reset that caught the first boot's writes: the pinned host key is on disk but
    //     empty while cloud-init counts its ssh module as done. The node must come back with
    //     the pinned key (cloud-init writes it again) instead of an sshd that never starts.
    let out = klab(
        &[
            "ssh",
            &format!("{LAB}/vm1"),
            "--",
            "sudo sh -c ': > /etc/ssh/ssh_host_ed25519_key; : > /etc/ssh/ssh_host_ed25519_key.pub; sync'",
        ],
        None,
    );
    assert!(out.status.success());
    virsh(&["destroy", &node.domain]);
    let report = up_json(lab_file);
    assert!(verified(&report), "{report}");
    let out = klab(
        &[
            "ssh",
            &format!("{LAB}/vm1"),
            "--",
            "sudo test -s /etc/ssh/ssh_host_ed25519_key && hostname",
        ],
        None,
    );
    assert!(out.status.success(), "the pinned key was not written again");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vm1");

    // 7. down after a kill (mid-rebuild: domain gone, fresh overlay, no seed) leaves nothing.
    up_killed_at(lab_file, "seed-upload", &["--recreate", "vm1"]);
    let out = klab(&["down", LAB], None);
    assert!(out.status.success());
    assert!(names(&["list", "--all", "--name"]).is_empty());
    assert!(names(&["net-list", "--all", "--name"]).is_empty());
    assert!(names(&["pool-list", "--all", "--name"]).is_empty());
    assert!(!klab::paths::state_root().join(LAB).exists());
    assert!(!Path::new(&node.console_log).exists(), "console log left");
    assert!(!klab::paths::pool_dir(LAB).exists(), "pool directory left");
}
