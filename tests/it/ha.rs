//! Real failover under QEMU/TCG (`cargo test --test it ha_ -- --include-ignored`): three control
//! planes behind the API VIP, held by keepalived (Debian's package, baked into the test image) over
//! unicast VRRP on the cluster network.
//!
//! What is real: the VMs, keepalived, VRRP, the VIP moving between nodes, the host reaching it, the
//! health check script, klab's serialized control-plane joins and its configs. What is a STAND-IN:
//! the Kubernetes packages (scripts/standin-repo.sh), so the "API server" on 6443 that keepalived's
//! check asks is the stand-in's listener (no API server can run here), and the etcd learner rule
//! the joins are checked against is the stand-in's.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::e2e::{klab, ok};

const LAB: &str = "e2eha";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 233, 2, 100);
const REPO_BIND: &str = "10.233.1.1:18090";
const NODES: [&str; 3] = ["cp1", "cp2", "cp3"];

struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = klab(&["down", LAB]);
    }
}

fn on(node: &str, cmd: &str) -> String {
    ok(&["ssh", &format!("{LAB}/{node}"), "--", cmd])
}

/// Which control planes have the VIP on their cluster NIC, asked of all three at once.
fn holders() -> Vec<String> {
    let handles: Vec<_> = NODES
        .iter()
        .map(|n| {
            let n = n.to_string();
            std::thread::spawn(move || {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_klab"))
                    .args([
                        "ssh",
                        &format!("{LAB}/{n}"),
                        "--",
                        "ip -o -4 addr show dev lab0",
                    ])
                    .output()
                    .expect("klab ssh");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                (n, text.contains(&format!(" {VIP}/32 ")))
            })
        })
        .collect();
    handles
        .into_iter()
        .filter_map(|h| {
            let (n, holds) = h.join().unwrap();
            holds.then_some(n)
        })
        .collect()
}

/// The node whose MAC the host's ARP table has for the VIP, after touching it (what `klab status`
/// reports too); `None` while nothing answers.
fn arp_holder(macs: &[(String, String)]) -> Option<String> {
    let reached =
        TcpStream::connect_timeout(&SocketAddr::from((VIP, 6443)), Duration::from_millis(700))
            .is_ok();
    if !reached {
        return None;
    }
    let arp = std::fs::read_to_string("/proc/net/arp").ok()?;
    let mac = klab::usecase::host::parse_proc_arp(&arp, VIP)?;
    macs.iter()
        .find(|(_, m)| m.eq_ignore_ascii_case(&mac))
        .map(|(n, _)| n.clone())
}

/// Polls until the VIP answers from a node other than `from`; the seconds it took.
fn wait_moved(macs: &[(String, String)], from: &str, limit: Duration) -> (String, f64) {
    let t = Instant::now();
    loop {
        if let Some(h) = arp_holder(macs)
            && h != from
        {
            return (h, t.elapsed().as_secs_f64());
        }
        assert!(
            t.elapsed() < limit,
            "the VIP did not leave {from} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Samples the holders a few times: never two at once, exactly one at the end.
fn assert_single_holder() -> String {
    let mut last = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        last = holders();
        assert!(last.len() <= 1, "two control planes hold the VIP: {last:?}");
    }
    assert_eq!(last.len(), 1, "nobody holds the VIP");
    last.remove(0)
}

#[test]
#[ignore = "needs libvirt qemu:///system, the test guest image with containerd and keepalived, dpkg-deb, apt-ftparchive and gpg"]
fn ha_control_planes_behind_a_vip_fail_over() {
    let lab_file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("labs/e2e-ha.toml");
    let lab_path = lab_file.to_str().unwrap();
    let _ = klab(&["down", LAB]);
    let _down = Down;
    let tmp = tempfile::tempdir().unwrap();
    super::standin_repo::build(tmp.path(), "core:/stable:");
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&["plan", lab_path, "--output", "json"])).unwrap();
    let macs: Vec<(String, String)> = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| {
            n["nics"].as_array().unwrap().iter().map(move |nic| {
                (
                    n["name"].as_str().unwrap().to_string(),
                    nic["mac"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect();

    let out = klab(&["up", lab_path, "--no-kubernetes"]);
    assert!(out.status.success(), "klab up --no-kubernetes failed");
    let _server = super::standin_repo::FileServer::start(REPO_BIND, tmp.path());
    let out = klab(&["up", lab_path, "--output", "json"]);
    assert!(out.status.success(), "klab up (provisioning) failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kubernetes"]["endpoint"], "10.233.2.100:6443");

    // Joins: one at a time, each through the VIP.
    let cluster: serde_json::Value =
        serde_json::from_str(&on("cp1", "sudo cat /var/lib/klab-standin/cluster.json")).unwrap();
    let mut joins: Vec<(f64, f64, String)> = cluster["controlPlaneJoins"]
        .as_array()
        .expect("controlPlaneJoins")
        .iter()
        .map(|j| {
            (
                j["start"].as_f64().unwrap(),
                j["end"].as_f64().unwrap(),
                j["node"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    joins.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(
        joins.iter().map(|j| j.2.as_str()).collect::<Vec<_>>(),
        ["cp2", "cp3"]
    );
    assert!(
        joins[0].1 <= joins[1].0,
        "control-plane joins overlapped: {joins:?}"
    );
    for n in ["cp2", "cp3"] {
        let config = on(
            n,
            "sudo sh -c 'cat /var/log/klab-standin/config-*-join.yaml'",
        );
        assert!(
            config.contains("apiServerEndpoint: \"10.233.2.100:6443\""),
            "{n}: the join does not name the VIP:\n{config}"
        );
    }
    // The kubelet's node-ip and Calico's address are never the VIP (klab's verify phase passed).
    for (n, ip) in [
        ("cp1", "10.233.2.11"),
        ("cp2", "10.233.2.12"),
        ("cp3", "10.233.2.13"),
    ] {
        let flags = on(n, "sudo cat /var/lib/kubelet/kubeadm-flags.env");
        assert!(flags.contains(&format!("--node-ip={ip}")), "{n}: {flags}");
        let conf = on(n, "sudo cat /etc/keepalived/keepalived.conf");
        assert!(
            conf.contains("    10.233.2.100/32 dev lab0\n"),
            "{n}: {conf}"
        );
        assert!(!conf.contains("${klab:"), "{n}: unfilled marker");
        assert_eq!(
            on(n, "sudo stat -c %a /etc/keepalived/keepalived.conf").trim(),
            "600"
        );
    }
    let kubeconfig = ok(&["kubeconfig", LAB]);
    assert!(kubeconfig.contains("server: https://10.233.2.100:6443"));

    // Exactly one holder, the first control plane; the host reaches the VIP; status agrees.
    let holder = assert_single_holder();
    assert_eq!(holder, "cp1", "the highest priority holds the VIP");
    assert_eq!(arp_holder(&macs).as_deref(), Some("cp1"));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["status", LAB, "--output", "json"])).unwrap();
    assert_eq!(status["kubernetes"]["vip_holder"], "cp1", "{status}");

    // A. keepalived stops on the holder: the VIP moves within 10 s and keeps answering.
    on("cp1", "sudo systemctl stop keepalived");
    let (to, secs) = wait_moved(&macs, "cp1", Duration::from_secs(10));
    eprintln!("keepalived stopped on cp1: the VIP moved to {to} in {secs:.1}s");
    assert_eq!(assert_single_holder(), to);
    on("cp1", "sudo systemctl start keepalived");
    assert_eq!(assert_single_holder(), "cp1", "cp1 takes the VIP back");

    // B. The holder's API server stops answering: its check fails, the VIP moves within 10 s.
    on("cp1", "sudo systemctl stop klab-standin-apiserver");
    let (to, secs) = wait_moved(&macs, "cp1", Duration::from_secs(10));
    eprintln!("the API server stopped on cp1: the VIP moved to {to} in {secs:.1}s");
    assert_eq!(assert_single_holder(), to);
    on("cp1", "sudo systemctl start klab-standin-apiserver");
    let back = assert_single_holder();
    assert_eq!(
        back, "cp1",
        "cp1 takes the VIP back once its API server answers"
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["status", LAB, "--output", "json"])).unwrap();
    assert_eq!(status["kubernetes"]["vip_holder"], "cp1", "{status}");

    ok(&["down", LAB]);
}
