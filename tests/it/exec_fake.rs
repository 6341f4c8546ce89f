//! The whole `up`/`down` use case on the recording fake backend, with a fake dialer standing in
//! for SSH: the real `klab::usecase::up` (keys, journal, pinned host keys, waits, verification)
//! and `klab::usecase::down`, state in a temp dir. Crashes are modelled by what a killed `up`
//! leaves behind (a journal short of `verified`), network loss by `net-destroy` on the fake.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klab::backend::fake::FakeBackend;
use klab::backend::{Backend, BackendError};
use klab::cli::OutputFormat;
use klab::exec::{BoxFuture, Dialer, NodeSession};
use klab::observed::DomainState;
use klab::output::Printer;
use klab::plan::{ImageSpec, LabPlan, LocalImage, NodeSpec};
use klab::provision::RemoteError;
use klab::provision::recording::{RecordingRemote, ok};
use klab::provision::ssh::SshTarget;
use klab::reconcile::Action;
use klab::reconcile::journal::{Journal, Step};
use klab::usecase::down::{DownRequest, down};
use klab::usecase::up::{UpOutcome, UpRequest, up};
use klab::usecase::{Env, Error, Images, Paths};

/// What a correctly booted node answers to klab's probe.
pub(crate) fn probe_output(n: &NodeSpec) -> String {
    let mut s = format!(
        "@@hostname\n{}\n@@link\n1: lo: <LOOPBACK> mtu 65536 link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n",
        n.name
    );
    for (i, nic) in n.nics.iter().enumerate() {
        s.push_str(&format!(
            "{}: {}: <BROADCAST,MULTICAST,UP> mtu 1500 qdisc fq_codel state UP link/ether {} brd ff:ff:ff:ff:ff:ff\n",
            i + 2,
            nic.ifname,
            nic.mac
        ));
    }
    s.push_str("@@addr\n");
    for (i, nic) in n.nics.iter().enumerate() {
        s.push_str(&format!(
            "{}: {}    inet {}/{} brd 10.255.255.255 scope global {}\n",
            i + 2,
            nic.ifname,
            nic.ip,
            nic.prefix,
            nic.ifname
        ));
    }
    s.push_str("@@route\n");
    if let Some(gw) = n.nics[0].gateway {
        s.push_str(&format!("default via {gw} dev {}\n", n.nics[0].ifname));
    }
    s
}

pub(crate) const CLOUD_INIT_DONE: &str =
    "@@result\n{\"v1\": {\"datasource\": \"nocloud\", \"errors\": []}}\n@@status\n{}\n";

/// Stands in for SSH: checks the pinned host key against the one in the lab's state, then
/// answers as a booted node. `vanish` makes the dial for one node delete its domain and hang,
/// as a node deleted while `up` waits for it.
struct FakeDialer {
    plan: Mutex<Option<LabPlan>>,
    state_dir: PathBuf,
    dialed: Mutex<Vec<String>>,
    vanish: Mutex<Option<(String, FakeBackend)>>,
}

impl Dialer for FakeDialer {
    fn dial<'a>(
        &'a self,
        target: &'a SshTarget,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn NodeSession>, RemoteError>> {
        Box::pin(async move {
            self.dialed.lock().unwrap().push(target.node.clone());
            let vanish = self.vanish.lock().unwrap().clone();
            if let Some((node, fake)) = vanish
                && node == target.node
            {
                let plan = self.plan.lock().unwrap().clone().unwrap();
                fake.delete_domain(&plan.node(&node).unwrap().domain);
                std::future::pending::<()>().await;
            }
            let pinned = std::fs::read_to_string(
                self.state_dir
                    .join("hostkeys")
                    .join(format!("{}.pub", target.node)),
            )
            .expect("host key generated before dialing");
            let key = |s: &str| s.split_whitespace().nth(1).unwrap_or_default().to_string();
            assert_eq!(
                key(&target.host_public_key),
                key(&pinned),
                "{}: klab must pin the key it generated",
                target.node
            );
            assert!(
                target.user_private_key.contains("OPENSSH PRIVATE KEY"),
                "the lab user's key is used"
            );
            let plan = self.plan.lock().unwrap().clone().unwrap();
            let node = plan.node(&target.node).unwrap();
            assert_eq!(target.addr.ip(), std::net::IpAddr::V4(node.ssh_address));
            let remote = RecordingRemote::new(&target.node)
                .on(klab::verify::CLOUD_INIT_WAIT_COMMAND, ok(CLOUD_INIT_DONE))
                .on(klab::verify::PROBE_COMMAND, ok(&probe_output(node)));
            Ok(Box::new(remote) as Box<dyn NodeSession>)
        })
    }
}

/// A base image that is "there" without a download.
pub(crate) struct StubImages(pub(crate) PathBuf);

impl Images for StubImages {
    fn local_images(&self) -> Result<Vec<LocalImage>, String> {
        Ok(vec![LocalImage {
            key: "debian-12".into(),
            path: self.0.join("debian-12.qcow2").display().to_string(),
            kernel: None,
            initrd: None,
            cmdline: None,
        }])
    }
    fn cache_root(&self) -> PathBuf {
        self.0.clone()
    }
    fn ensure(&self, _spec: &ImageSpec, _quiet: bool) -> Result<(), String> {
        Ok(())
    }
}

struct World {
    _tmp: tempfile::TempDir,
    env: Env,
    fake: FakeBackend,
    dialer: Arc<FakeDialer>,
    lab: klab::model::Lab,
    lab_file: PathBuf,
    state_dir: PathBuf,
}

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let lab_file = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/labs/e2e-isolated.toml"
    ));
    let text = std::fs::read_to_string(&lab_file).unwrap();
    let lab = klab::config::parse_str(&text, "labs/e2e-isolated.toml").unwrap();
    let fake = FakeBackend::new();
    let paths = Paths {
        state_root: tmp.path().join("labs"),
        data_root: tmp.path().join("data"),
    };
    let state_dir = paths.state_root.join(&lab.name);
    let dialer = Arc::new(FakeDialer {
        plan: Mutex::new(None),
        state_dir: state_dir.clone(),
        dialed: Mutex::new(Vec::new()),
        vanish: Mutex::new(None),
    });
    let f = fake.clone();
    let env = Env {
        connector: Arc::new(
            move |_uri: &str| -> Result<Arc<dyn Backend>, BackendError> { Ok(Arc::new(f.clone())) },
        ),
        dialer: dialer.clone(),
        images: Arc::new(StubImages(tmp.path().join("images"))),
        paths,
        printer: Printer::new(OutputFormat::Json),
        call_timeout: Duration::from_secs(10),
        host_checks: false,
    };
    World {
        _tmp: tmp,
        env,
        fake,
        dialer,
        lab,
        lab_file,
        state_dir,
    }
}

impl World {
    fn request(&self, recreate: &[&str]) -> UpRequest {
        UpRequest {
            lab_file: Some(self.lab_file.clone()),
            ..fake_request(&self.lab, None, recreate)
        }
    }

    async fn up(&self) -> Result<UpOutcome, Error> {
        self.dialer.dialed.lock().unwrap().clear();
        let r = up(&self.env, self.request(&[])).await;
        if let Ok(UpOutcome::Done { plan, .. }) = &r {
            *self.dialer.plan.lock().unwrap() = Some((**plan).clone());
        }
        r
    }

    /// The plan as `up` makes it (needed by the dialer before the first dial).
    async fn prime(&self) {
        let mut req = self.request(&[]);
        req.dry_run = true;
        // A dry run on a fresh lab renders placeholders; the addresses and names are the same.
        if let UpOutcome::DryRun { plan, .. } = up(&self.env, req).await.unwrap() {
            *self.dialer.plan.lock().unwrap() = Some(*plan);
        }
    }

    fn dialed(&self) -> Vec<String> {
        let mut d = self.dialer.dialed.lock().unwrap().clone();
        d.sort();
        d
    }

    fn journal(&self) -> Journal {
        serde_json::from_str(&std::fs::read_to_string(self.state_dir.join("journal.json")).unwrap())
            .unwrap()
    }

    fn save_journal(&self, j: &Journal) {
        std::fs::write(
            self.state_dir.join("journal.json"),
            serde_json::to_string(j).unwrap(),
        )
        .unwrap();
    }
}

fn changed(out: &UpOutcome) -> bool {
    match out {
        UpOutcome::Done { changed, .. } => *changed,
        UpOutcome::DryRun { .. } => panic!("not a dry run"),
    }
}

fn all_verified(j: &Journal, nodes: &[&str]) {
    for n in nodes {
        assert_eq!(
            j.nodes.get(*n).map(|r| r.step),
            Some(Step::Verified),
            "{n}: {j:?}"
        );
    }
}

const NODES: [&str; 3] = ["vm1", "vm2", "vm3"];

#[tokio::test]
async fn up_waits_verifies_journals_converges_after_a_crash_and_down_cleans_everything() {
    let w = world();
    w.prime().await;
    w.fake
        .inject_network(
            "<network><name>klab-e2e-lookalike</name><bridge name='kltest-la9'/></network>",
            true,
        )
        .unwrap();
    w.fake
        .inject_domain(
            "<domain type='qemu'><name>klab-e2e-impostor</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>",
            DomainState::Running,
        )
        .unwrap();

    // 1. A fresh up creates, dials every node with its pinned key, verifies and journals them.
    let out = w.up().await.unwrap();
    assert!(changed(&out));
    let UpOutcome::Done { plan, reports, .. } = &out else {
        unreachable!()
    };
    assert_eq!(w.dialed(), NODES);
    assert!(
        reports
            .iter()
            .all(|r| r.created && r.ready_seconds.is_some())
    );
    let steps: Vec<&str> = reports[0]
        .timeline
        .iter()
        .map(|(s, _)| s.as_str())
        .collect();
    assert_eq!(
        steps,
        vec![
            "creating disk",
            "creating seed",
            "booting",
            "ssh",
            "cloud-init",
            "verifying",
            "verified"
        ]
    );
    for n in &plan.nodes {
        assert_eq!(
            w.fake.domain(&n.domain).map(|d| d.state),
            Some(DomainState::Running)
        );
        let seed = w.fake.volume(&plan.pool.name, &n.seed.name).expect("seed");
        assert_eq!(
            &seed.data.unwrap()[43..54],
            b"CIDATA     ",
            "{}: FAT label",
            n.name
        );
    }
    let j = w.journal();
    assert_eq!(j.version, 1);
    assert!(j.created_pool("klab-e2e"));
    all_verified(&j, &NODES);

    // 2. A second up changes nothing and dials nobody.
    w.fake.clear_calls();
    let out = w.up().await.unwrap();
    assert!(!changed(&out));
    assert!(w.dialed().is_empty());
    assert!(w.fake.mutations().is_empty(), "{:?}", w.fake.mutations());

    // 3. What a kill during vm2's boot leaves: the domain runs, the journal says "started".
    //    The rerun waits for and verifies vm2 again, and creates nothing.
    let mut j = w.journal();
    let h = j.nodes["vm2"].seed_hash.clone();
    j.reach("vm2", Step::Started, &h);
    w.save_journal(&j);
    w.fake.clear_calls();
    let out = w.up().await.unwrap();
    assert!(changed(&out));
    assert_eq!(w.dialed(), vec!["vm2"]);
    assert!(w.fake.mutations().is_empty(), "{:?}", w.fake.mutations());
    all_verified(&w.journal(), &NODES);

    // 4. `virsh net-destroy` of net1: up restarts the network AND the nodes on it, then verifies.
    let net1 = plan.network("net1").unwrap().name.clone();
    assert!(w.fake.set_network_active(&net1, false));
    w.fake.clear_calls();
    let out = w.up().await.unwrap();
    assert!(changed(&out));
    assert_eq!(w.dialed(), NODES);
    let muts = w.fake.mutations();
    assert_eq!(muts[0], format!("ensure_network {net1}"), "{muts:?}");
    for n in &plan.nodes {
        assert!(
            muts.contains(&format!("stop_domain {}", n.domain)),
            "{muts:?}"
        );
        assert!(
            muts.contains(&format!("start_domain {}", n.domain)),
            "{muts:?}"
        );
        assert!(w.fake.domain(&n.domain).unwrap().detached.is_empty());
    }
    all_verified(&w.journal(), &NODES);

    // 5. down removes the lab's objects, console logs and state, and nothing else.
    let console = w.env.paths.console_dir();
    std::fs::create_dir_all(&console).unwrap();
    for n in &plan.nodes {
        std::fs::write(&n.console_log, "boot\n").unwrap();
    }
    let out = down(
        &w.env,
        DownRequest {
            lab: "e2e".into(),
            connect: None,
            dry_run: false,
            keep_state: false,
        },
    )
    .await
    .unwrap();
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, Action::RemovePool { .. }))
    );
    assert_eq!(w.fake.domain_names(), vec!["klab-e2e-impostor".to_string()]);
    assert_eq!(
        w.fake.network_names(),
        vec!["klab-e2e-lookalike".to_string()]
    );
    assert!(!w.fake.pool_names().contains(&plan.pool.name));
    let left: Vec<_> = out.left.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(left, vec!["klab-e2e-impostor", "klab-e2e-lookalike"]);
    for n in &plan.nodes {
        assert!(
            !Path::new(&n.console_log).exists(),
            "{} left",
            n.console_log
        );
    }
    assert!(!w.state_dir.exists(), "state dir removed");
}

#[tokio::test]
async fn a_domain_deleted_while_up_waits_for_it_is_reported_at_once() {
    let w = world();
    w.prime().await;
    *w.dialer.vanish.lock().unwrap() = Some(("vm3".into(), w.fake.clone()));
    let t0 = Instant::now();
    let err = w.up().await.unwrap_err().to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?} (the lab's SSH timeout is 4 minutes)",
        t0.elapsed()
    );
    assert!(
        err.contains("node `vm3` failed at ssh: domain klab-e2e-vm3 disappeared while klab waited for the node"),
        "{err}"
    );
    // The other nodes were verified; the rerun recreates vm3 alone.
    let j = w.journal();
    all_verified(&j, &["vm1", "vm2"]);
    *w.dialer.vanish.lock().unwrap() = None;
    let out = w.up().await.unwrap();
    let UpOutcome::Done { reports, .. } = &out else {
        unreachable!()
    };
    let created: Vec<&str> = reports
        .iter()
        .filter(|r| r.created)
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(created, vec!["vm3"]);
    all_verified(&w.journal(), &NODES);
}

#[tokio::test]
async fn a_wedged_hypervisor_call_fails_with_its_name_instead_of_hanging() {
    let mut w = world();
    w.prime().await;
    w.env.call_timeout = Duration::from_millis(300);
    w.fake.delay("define_and_start", Duration::from_secs(2));
    let t0 = Instant::now();
    let err = w.up().await.unwrap_err().to_string();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(
        err.contains("fake did not answer `define and start domain klab-e2e-vm1` within 0.3s; is libvirtd wedged?"),
        "{err}"
    );
}

#[tokio::test]
async fn a_failed_up_or_down_leaves_no_new_state_directory() {
    let mut w = world();
    w.env.connector = Arc::new(|uri: &str| -> Result<Arc<dyn Backend>, BackendError> {
        Err(BackendError::Connect {
            uri: uri.to_string(),
            message: "libvirtd is not running".into(),
        })
    });
    let err = w.up().await.unwrap_err();
    assert!(err.to_string().contains("libvirtd is not running"), "{err}");
    assert!(!w.state_dir.exists(), "up left {}", w.state_dir.display());
    let err = down(
        &w.env,
        DownRequest {
            lab: "e2e".into(),
            connect: None,
            dry_run: false,
            keep_state: false,
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("libvirtd is not running"), "{err}");
    assert!(!w.state_dir.exists(), "down left {}", w.state_dir.display());
}

#[tokio::test]
async fn a_dry_run_while_another_up_holds_the_lock_says_the_lab_is_busy() {
    let w = world();
    let st = klab::state::StateDir::new(&w.env.paths.state_root, "e2e");
    let _held = st.lock().unwrap();
    let mut req = w.request(&[]);
    req.dry_run = true;
    let err = up(&w.env, req).await.err().unwrap().to_string();
    assert!(err.starts_with("lab `e2e` is busy"), "{err}");
}

#[tokio::test]
async fn down_and_status_work_with_a_damaged_plan_and_with_an_old_format_one() {
    let w = world();
    w.prime().await;
    w.up().await.unwrap();
    std::fs::write(w.state_dir.join("plan.json"), "{ this is not json").unwrap();
    let st = klab::usecase::status::status(&w.env, "e2e", None)
        .await
        .unwrap();
    assert_eq!(st.damaged.len(), 1, "{:?}", st.damaged);
    let names: Vec<&str> = st.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, NODES);
    assert!(st.nodes.iter().all(|n| n.state == "running"));

    // A plan.json as klab 0.1 wrote it (no version, fields this klab does not have).
    std::fs::write(
        w.state_dir.join("plan.json"),
        r#"{"lab":"e2e","pool":{"name":"klab-e2e","owned":true,"legacy":1},"nodes":[
            {"name":"vm1","domain":"klab-e2e-vm1","overlay":{"name":"vm1.qcow2"},"seed":{"name":"vm1-seed.img"}}]}"#,
    )
    .unwrap();
    std::fs::write(
        w.state_dir.join("meta.json"),
        r#"{"lab":"e2e","uri":"fake:///","accel":"qemu","source":null}"#,
    )
    .unwrap();
    down(
        &w.env,
        DownRequest {
            lab: "e2e".into(),
            connect: None,
            dry_run: false,
            keep_state: false,
        },
    )
    .await
    .unwrap();
    assert!(
        w.fake.domain_names().is_empty(),
        "{:?}",
        w.fake.domain_names()
    );
    assert!(w.fake.network_names().is_empty());
    assert!(w.fake.pool_names().is_empty(), "{:?}", w.fake.pool_names());
    assert!(!w.state_dir.exists());
}

#[tokio::test]
async fn down_keeping_state_forgets_the_journal_and_the_next_up_rebuilds_and_verifies() {
    let w = world();
    w.prime().await;
    w.up().await.unwrap();
    let keep = DownRequest {
        lab: "e2e".into(),
        connect: None,
        dry_run: false,
        keep_state: true,
    };
    down(&w.env, keep).await.unwrap();
    assert!(!w.state_dir.join("journal.json").exists());
    assert!(
        w.state_dir.join("hostkeys/vm1.pub").exists(),
        "keys are kept"
    );
    let out = w.up().await.unwrap();
    let UpOutcome::Done { reports, .. } = &out else {
        unreachable!()
    };
    assert!(reports.iter().all(|r| r.created), "{reports:?}");
    all_verified(&w.journal(), &NODES);
}

/// `klab up` of `lab` on the fake hypervisor, VMs only (no lab file, no Kubernetes).
pub(crate) fn fake_request(
    lab: &klab::model::Lab,
    copy: Option<&str>,
    recreate: &[&str],
) -> UpRequest {
    UpRequest {
        lab: lab.clone(),
        lab_file: None,
        uri: "fake:///".into(),
        accel: klab::model::Accel::Auto,
        templates: klab::render::Templates::builtin().unwrap(),
        dry_run: false,
        recreate: recreate
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        jobs: 3,
        host: Default::default(),
        kubernetes: false,
        allow_unpinned: false,
        copy: copy.map(String::from),
        subnet_pool: None,
    }
}
