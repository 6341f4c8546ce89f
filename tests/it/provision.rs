//! Real end-to-end provisioning under QEMU/TCG (`cargo test --test it provision -- --include-ignored`):
//! `klab up labs/e2e-kubernetes.toml` builds a one-control-plane, one-worker cluster over klab's
//! pinned SSH sessions on isolated networks.
//!
//! What is real: the VMs, cloud-init, SSH, preflight (modules, sysctls, swap, cgroup v2), apt with
//! klab's keyring and source, version resolution and holds, containerd from Debian with klab's
//! config (checked from inside the guests), klab's CA, token and certificate key, the rendered
//! kubeadm configs, the journal, resume, per-node logs and the kubeconfig hand-over. What is a
//! STAND-IN: the Kubernetes packages (kubeadm/kubelet/kubectl/cri-tools from
//! scripts/standin-repo.sh, served here from the host's address on the lab's `outside` network)
//! and so the cluster they simulate — including how calico-node would autodetect its address —
//! and the Calico manifest (tests/fixtures/calico/calico.yaml, the real manifest's shape).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::e2e::{klab, ok};
use klab::reconcile::journal::Journal;

const LAB: &str = "e2ek8s";
/// The host's address on the lab's `outside` network and the port the lab file names.
const REPO_BIND: &str = "10.232.1.1:18089";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Removes the lab when the test ends, also when it fails.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = klab(&["down", LAB]);
    }
}

fn state_dir() -> PathBuf {
    klab::paths::state_root().join(LAB)
}

fn journal() -> Journal {
    let text = std::fs::read_to_string(state_dir().join("journal.json")).expect("journal.json");
    serde_json::from_str(&text).expect("journal parses")
}

fn phase_done(j: &Journal, node: &str, phase: &str) -> bool {
    j.nodes
        .get(node)
        .and_then(|r| r.phases.get(phase))
        .is_some_and(|p| p.status == "done")
}

/// `klab ssh LAB/NODE -- CMD` stdout.
fn on(node: &str, cmd: &str) -> String {
    ok(&["ssh", &format!("{LAB}/{node}"), "--", cmd])
}

fn up_json(lab_file: &str) -> serde_json::Value {
    let out = klab(&["up", lab_file, "--output", "json"]);
    assert!(out.status.success(), "klab up {lab_file} failed");
    serde_json::from_slice(&out.stdout).expect("up -o json")
}

/// The `kubernetes.phases` entry of `up -o json` for `phase`.
fn phase<'a>(report: &'a serde_json::Value, phase: &str) -> &'a serde_json::Value {
    report["kubernetes"]["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .find(|p| p["phase"] == phase)
        .unwrap_or_else(|| panic!("no phase {phase} in {report}"))
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
#[ignore = "needs libvirt qemu:///system, the test guest image with containerd, dpkg-deb, apt-ftparchive and gpg"]
fn provision_builds_a_pinned_cluster_resumes_and_adds_a_worker() {
    let lab_file = repo().join("labs/e2e-kubernetes.toml");
    let lab_path = lab_file.to_str().unwrap();
    let _ = klab(&["down", LAB]);
    let _down = Down;
    let tmp = tempfile::tempdir().unwrap();
    super::standin_repo::build(tmp.path(), "core:/stable:");

    // 1. The VMs alone: the repository can only be served once the lab's bridge exists.
    let out = klab(&["up", lab_path, "--no-kubernetes", "--output", "json"]);
    assert!(out.status.success(), "klab up --no-kubernetes failed");
    let vms: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        vms["kubernetes"].is_null(),
        "--no-kubernetes ran the provisioner: {vms}"
    );
    let _server = super::standin_repo::FileServer::start(REPO_BIND, tmp.path());

    // 2. Killed right after the containerd phase was recorded…
    let killed = std::process::Command::new(env!("CARGO_BIN_EXE_klab"))
        .args(["up", lab_path])
        .env("KLAB_CONNECT", "qemu:///system")
        .env("KLAB_ACCEL", "qemu")
        .env("KLAB_TEST_KILL_AT", "provision-after-containerd")
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&killed.stderr));
    assert!(!killed.status.success(), "the kill point was not reached");
    let j = journal();
    for node in ["cp1", "w1"] {
        for ph in [
            "preflight",
            "package-repo",
            "kubernetes-packages",
            "containerd",
        ] {
            assert!(
                phase_done(&j, node, ph),
                "{node}: {ph} not recorded before the kill"
            );
        }
        assert!(!phase_done(&j, node, "kubeadm-init") && !phase_done(&j, node, "join-workers"));
    }
    assert!(phase_done(&j, "cp1", "resolve-version"));

    // 3. …the rerun resumes at kubeadm-init: nothing finished runs again.
    let report = up_json(lab_path);
    let k = &report["kubernetes"];
    assert_eq!(k["changed"], true, "{report}");
    assert_eq!(k["version"], "1.36.4", "the newest patch in the repository");
    assert_eq!(k["endpoint"], "10.232.2.10:6443");
    for ph in [
        "preflight",
        "package-repo",
        "kubernetes-packages",
        "containerd",
    ] {
        let p = phase(&report, ph);
        assert!(
            names(&p["ran"]).is_empty() && names(&p["already"]).is_empty(),
            "{ph} ran again: {p}"
        );
        assert_eq!(names(&p["journal"]), ["cp1", "w1"], "{ph}");
    }
    assert_eq!(names(&phase(&report, "kubeadm-init")["ran"]), ["cp1"]);
    assert_eq!(names(&phase(&report, "join-workers")["ran"]), ["w1"]);
    assert_eq!(names(&phase(&report, "verify")["ran"]), ["cp1"]);

    // 4. From inside the guests: what preflight, apt and containerd really did.
    for (node, ip) in [("cp1", "10.232.2.10"), ("w1", "10.232.2.11")] {
        let modules = on(node, "cat /proc/modules");
        for m in ["overlay ", "br_netfilter "] {
            assert!(
                modules.lines().any(|l| l.starts_with(m)),
                "{node}: {m}not loaded"
            );
        }
        assert_eq!(
            on(
                node,
                "sudo sysctl -n net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables"
            ),
            "1\n1\n1\n"
        );
        assert_eq!(on(node, "sudo swapon --noheadings --show"), "");
        assert!(on(node, "cat /etc/modules-load.d/klab-kubernetes.conf").contains("br_netfilter"));
        let dump = on(node, "sudo containerd config dump");
        assert!(dump.contains("SystemdCgroup = true"), "{node}: {dump}");
        assert!(
            dump.contains("bin_dir = \"/opt/cni/bin\""),
            "{node}: CNI dir"
        );
        assert!(
            dump.contains("registry.k8s.io/pause:3.10.1"),
            "{node}: sandbox image"
        );
        // crictl is the stand-in; it asks the real containerd whether its CRI plugin is up.
        assert!(on(node, "sudo crictl info").contains("RuntimeReady"));
        assert_eq!(
            on(node, "apt-mark showhold | sort | tr '\\n' ' '"),
            "kubeadm kubectl kubelet "
        );
        assert_eq!(
            on(
                node,
                "dpkg-query -W -f '${Version}' kubeadm kubelet kubectl"
            ),
            "1.36.4-1.11.36.4-1.11.36.4-1.1"
        );
        let flags = on(node, "sudo cat /var/lib/kubelet/kubeadm-flags.env");
        assert!(
            flags.contains(&format!("--node-ip={ip}")),
            "{node}: {flags}"
        );
        // klab's CA is the cluster's.
        let ca = on(node, "sudo cat /etc/kubernetes/pki/ca.crt");
        let ours = std::fs::read_to_string(state_dir().join("cluster/ca.crt")).unwrap();
        assert_eq!(ca.trim(), ours.trim(), "{node}: not klab's CA");
    }
    let nodes = on(
        "cp1",
        "sudo kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes -o wide",
    );
    eprintln!("{nodes}");
    assert!(
        nodes.contains("10.232.2.10") && nodes.contains("10.232.2.11"),
        "{nodes}"
    );

    // 5. The hand-over: an owner-only kubeconfig naming the lab, reachable from the host.
    let st = state_dir();
    let kc = st.join("kubeconfig");
    assert_eq!(mode(&kc), 0o600);
    for f in [
        "cluster/ca.key",
        "cluster/bootstrap-token",
        "cluster/certificate-key",
        "logs/cp1.log",
        "logs/w1.log",
    ] {
        assert_eq!(mode(&st.join(f)), 0o600, "{f}");
    }
    let printed = ok(&["kubeconfig", LAB]);
    assert!(
        printed.contains("server: https://10.232.2.10:6443"),
        "{printed}"
    );
    assert!(printed.contains("current-context: e2ek8s"), "{printed}");
    let user_kc = tmp.path().join("kube/config");
    let merged = klab_env(
        &["kubeconfig", LAB, "--merge"],
        &[("KUBECONFIG", user_kc.to_str().unwrap())],
    );
    assert!(merged.status.success());
    assert_eq!(mode(&user_kc), 0o600);
    assert!(
        std::fs::read_to_string(&user_kc)
            .unwrap()
            .contains("name: klab-e2ek8s")
    );
    std::net::TcpStream::connect_timeout(
        &"10.232.2.10:6443".parse().unwrap(),
        std::time::Duration::from_secs(10),
    )
    .expect("the host reaches the API endpoint");
    // Secrets never reach the logs.
    let token = std::fs::read_to_string(st.join("cluster/bootstrap-token")).unwrap();
    let cert_key = std::fs::read_to_string(st.join("cluster/certificate-key")).unwrap();
    for f in ["logs/cp1.log", "logs/w1.log", "plan.json", "journal.json"] {
        let text = std::fs::read_to_string(st.join(f)).unwrap();
        assert!(
            !text.contains(token.trim()) && !text.contains(cert_key.trim()),
            "{f} holds a secret"
        );
    }

    // 6. Again: nothing to do, and it says so.
    let again = up_json(lab_path);
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(again["kubernetes"]["changed"], false, "{again}");

    // 7. A worker added to the file is prepared and joined alone.
    let node = "[[nodes]]\nname = \"w2\"\nrole = \"worker\"\n\
                nics = [ { network = \"outside\", ip = \"10.232.1.12\" }, { network = \"cluster\", ip = \"10.232.2.12\" } ]\n\n";
    let grown = std::fs::read_to_string(&lab_file)
        .unwrap()
        .replace(
            "../tests/fixtures/calico/calico.yaml",
            repo()
                .join("tests/fixtures/calico/calico.yaml")
                .to_str()
                .unwrap(),
        )
        .replacen("[kubernetes]", &format!("{node}[kubernetes]"), 1);
    let grown_file = tmp.path().join("grown.toml");
    std::fs::write(&grown_file, grown).unwrap();
    let added = up_json(grown_file.to_str().unwrap());
    for ph in [
        "preflight",
        "kubernetes-packages",
        "containerd",
        "join-workers",
    ] {
        assert_eq!(names(&phase(&added, ph)["ran"]), ["w2"], "{ph}: {added}");
    }
    assert!(names(&phase(&added, "kubeadm-init")["ran"]).is_empty());
    let flags = on("w2", "sudo cat /var/lib/kubelet/kubeadm-flags.env");
    assert!(flags.contains("--node-ip=10.232.2.12"), "w2: {flags}");

    // 8. Out of the file again: w2 is drained, reset and deleted from the cluster before its VM
    //    goes; the cluster check of the next rerun finds every remaining member.
    let shrunk = up_json(lab_path);
    assert_eq!(shrunk["changed"], true, "{shrunk}");
    let gone = klab(&[
        "ssh",
        &format!("{LAB}/cp1"),
        "--",
        "sudo kubectl --kubeconfig /etc/kubernetes/admin.conf get node w2",
    ]);
    assert!(!gone.status.success(), "w2 is still a Node of the cluster");
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    assert!(
        super::e2e::virsh_names(&["list", "--all", "--name"])
            .iter()
            .all(|d| d != "klab-e2ek8s-w2"),
        "w2's VM is still there"
    );
    let again = up_json(lab_path);
    assert_eq!(again["changed"], false, "{again}");

    // 9. Down removes all of it.
    ok(&["down", LAB]);
    assert!(!st.exists(), "state left behind");
}

fn klab_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_klab"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run klab");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}
