//! Real snapshot and reset under QEMU/TCG (`cargo test --test it snapshot_ -- --include-ignored`):
//! `klab up --snapshot`, then a marker file and a broken second NIC inside the guest, then
//! `klab reset`: the marker is gone, the address is back, the clock is the host's (the ratio of
//! reset to fresh `up` is printed; scripts/bench-reset.sh is the benchmark).

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use super::e2e::{klab, ok};

const LAB: &str = "e2ecp";
const COPY: &str = "snap";
const NAME: &str = "e2ecp-snap";

struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = klab(&["down", LAB, "--copy", COPY]);
    }
}

fn on(cmd: &str) -> String {
    ok(&["ssh", &format!("{NAME}/vm"), "--", cmd])
}

#[test]
#[ignore = "needs libvirt qemu:///system and the test guest image"]
fn snapshot_reset_puts_the_lab_back_in_seconds() {
    let lab_file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("labs/e2e-copies.toml");
    let lab_path = lab_file.to_str().unwrap();
    let _ = klab(&["down", LAB, "--copy", COPY]);
    let _down = Down;

    let t = Instant::now();
    let out = klab(&["up", lab_path, "--copy", COPY, "--snapshot"]);
    let up_secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "klab up --snapshot failed");
    let list: serde_json::Value = serde_json::from_str(&ok(&[
        "snapshot", "list", LAB, "--copy", COPY, "--output", "json",
    ]))
    .unwrap();
    assert_eq!(list["snapshots"][0]["name"], "initial", "{list}");

    let net1 = on("ip -o -4 addr show dev net1");
    assert!(net1.contains(" inet "), "{net1}");
    on("echo broken > /home/klab/marker && sudo ip addr flush dev net1");
    assert!(!on("ip -o -4 addr show dev net1").contains(" inet "));
    // The guest's clock after a revert is the one at the snapshot: let time pass so it shows.
    std::thread::sleep(std::time::Duration::from_secs(20));

    let t = Instant::now();
    let out = klab(&["reset", LAB, "--copy", COPY, "--output", "json"]);
    let reset_secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "klab reset failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let behind = report["clock_behind"]["vm"]
        .as_f64()
        .expect("clock measured");
    assert!(behind > 15.0, "the reverted clock was not behind: {report}");

    assert_eq!(
        on("test -e /home/klab/marker && echo there || echo gone").trim(),
        "gone"
    );
    assert_eq!(on("ip -o -4 addr show dev net1"), net1, "net1 is back");
    let guest: f64 = on("date -u +%s.%N").trim().parse().unwrap();
    let host = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (host - guest).abs() < 10.0,
        "guest clock {guest} vs host {host}"
    );
    // The figure, not a timed assertion (scripts/bench-reset.sh is the benchmark).
    eprintln!(
        "reset / up = {reset_secs:.1}s / {up_secs:.1}s = {:.3}",
        reset_secs / up_secs
    );

    // Down removes the snapshots with the lab.
    ok(&["down", LAB, "--copy", COPY]);
    assert!(!klab::paths::state_root().join(NAME).exists());
}

// ---- The snapshot use case on the fake backend (no VMs) ----

/// A lab brought up by the real `up` use case on the recording fake backend, with a dialer that
/// answers as booted nodes (the clock command and klab's probe included). Copies' tests use it too.
pub(crate) mod fake_lab {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use klab::backend::fake::FakeBackend;
    use klab::backend::{Backend, BackendError};
    use klab::cli::OutputFormat;
    use klab::exec::{BoxFuture, Dialer, NodeSession};
    use klab::output::Printer;
    use klab::plan::LabPlan;
    use klab::provision::RemoteError;
    use klab::provision::recording::{RecordingRemote, ok};
    use klab::provision::ssh::SshTarget;
    use klab::usecase::up::{UpOutcome, UpRequest};
    use klab::usecase::{Connector, Env, Error, Paths};

    use crate::exec_fake::{CLOUD_INIT_DONE, StubImages, probe_output};
    /// What the guest's clock said before klab set it (unix seconds): far behind the host's.
    pub const GUEST_CLOCK: f64 = 1_000_000.0;

    /// Answers as the node the saved plan of any lab under `state_root` has at that address.
    struct NodeDialer {
        state_root: PathBuf,
        commands: Arc<Mutex<Vec<(String, String)>>>,
    }

    impl Dialer for NodeDialer {
        fn dial<'a>(
            &'a self,
            target: &'a SshTarget,
            _timeout: Duration,
        ) -> BoxFuture<'a, Result<Box<dyn NodeSession>, RemoteError>> {
            Box::pin(async move {
                let node = klab::state::list_labs(&self.state_root)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|l| {
                        klab::state::StateDir::new(&self.state_root, l)
                            .load_plan()
                            .ok()
                            .flatten()
                    })
                    .flat_map(|p: LabPlan| p.nodes)
                    .find(|n| {
                        n.name == target.node
                            && std::net::IpAddr::V4(n.ssh_address) == target.addr.ip()
                    })
                    .ok_or_else(|| RemoteError::Connect {
                        node: target.node.clone(),
                        addr: target.addr.to_string(),
                        message: "no such node in any saved plan".into(),
                    })?;
                self.commands
                    .lock()
                    .unwrap()
                    .push((target.node.clone(), "dial".into()));
                let remote = RecordingRemote::new(&target.node)
                    .on(klab::verify::CLOUD_INIT_WAIT_COMMAND, ok(CLOUD_INIT_DONE))
                    .on(klab::verify::PROBE_COMMAND, ok(&probe_output(&node)))
                    .on_prefix("g=$(date -u +%s.%N);", ok(&format!("{GUEST_CLOCK}\n")));
                Ok(Box::new(remote) as Box<dyn NodeSession>)
            })
        }
    }

    pub struct FakeLab {
        pub _tmp: tempfile::TempDir,
        pub env: Env,
        pub fake: FakeBackend,
        pub lab: klab::model::Lab,
        /// Every dial, as (node, "dial").
        pub dials: Arc<Mutex<Vec<(String, String)>>>,
    }

    /// `labs/e2e-isolated.toml` (vm1, vm2, vm3), nothing created yet.
    pub fn new() -> FakeLab {
        let fake = FakeBackend::new();
        let f = fake.clone();
        with_connector(
            fake,
            Arc::new(
                move |_uri: &str| -> Result<Arc<dyn Backend>, BackendError> {
                    Ok(Arc::new(f.clone()))
                },
            ),
        )
    }

    pub fn with_connector(fake: FakeBackend, connector: Arc<dyn Connector>) -> FakeLab {
        let tmp = tempfile::tempdir().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/labs/e2e-isolated.toml");
        let lab = klab::config::parse_str(&std::fs::read_to_string(path).unwrap(), path).unwrap();
        let paths = Paths {
            state_root: tmp.path().join("labs"),
            data_root: tmp.path().join("data"),
        };
        let dials = Arc::new(Mutex::new(Vec::new()));
        let env = Env {
            connector,
            dialer: Arc::new(NodeDialer {
                state_root: paths.state_root.clone(),
                commands: dials.clone(),
            }),
            images: Arc::new(StubImages(tmp.path().join("images"))),
            paths,
            printer: Printer::new(OutputFormat::Json),
            call_timeout: Duration::from_secs(10),
            host_checks: false,
        };
        FakeLab {
            _tmp: tmp,
            env,
            fake,
            lab,
            dials,
        }
    }

    impl FakeLab {
        pub fn request(&self, copy: Option<&str>, recreate: &[&str]) -> UpRequest {
            crate::exec_fake::fake_request(&self.lab, copy, recreate)
        }

        pub async fn up(&self, recreate: &[&str]) -> Result<Box<LabPlan>, Error> {
            match klab::usecase::up::up(&self.env, self.request(None, recreate)).await? {
                UpOutcome::Done { plan, .. } => Ok(plan),
                UpOutcome::DryRun { .. } => unreachable!("not a dry run"),
            }
        }

        pub fn registry(&self) -> klab::registry::Entries {
            klab::registry::Registry::new(&self.env.paths.data_root)
                .read()
                .unwrap()
        }
    }
}

mod on_the_fake {
    use std::collections::BTreeSet;

    use klab::observed::DomainState;
    use klab::plan::LabPlan;
    use klab::render::Templates;
    use klab::usecase::down::{DownRequest, down};
    use klab::usecase::snapshot;

    use super::fake_lab::{self, FakeLab, GUEST_CLOCK};

    const LAB: &str = "e2e";

    fn states(w: &FakeLab, plan: &LabPlan) -> Vec<DomainState> {
        plan.nodes
            .iter()
            .map(|n| w.fake.domain(&n.domain).unwrap().state)
            .collect()
    }

    fn all_running(w: &FakeLab, plan: &LabPlan) {
        assert_eq!(
            states(w, plan),
            [DomainState::Running; 3],
            "{:?}",
            w.fake.calls()
        );
    }

    async fn save(w: &FakeLab, name: &str) -> Result<snapshot::SnapshotInfo, klab::usecase::Error> {
        snapshot::save(&w.env, LAB, name, None, &Templates::builtin().unwrap()).await
    }

    fn user_error(e: &klab::usecase::Error) -> (String, String) {
        (e.to_string(), e.hint().unwrap_or_default().to_string())
    }

    #[tokio::test]
    async fn snapshot_save_pauses_all_and_a_node_failing_mid_save_rolls_back_and_resumes_all() {
        let w = fake_lab::new();
        let plan = w.up(&[]).await.unwrap();
        let (vm1, vm2) = (&plan.nodes[0].domain, &plan.nodes[1].domain);

        // vm2's snapshot fails: vm1's is deleted again, all three run, nothing is recorded.
        w.fake.fail_object("create_snapshot", vm2);
        w.fake.clear_calls();
        let err = save(&w, "initial").await.unwrap_err();
        assert!(
            err.to_string().contains("snapshot `initial` was not taken")
                && err.to_string().contains("injected failure"),
            "{err}"
        );
        all_running(&w, &plan);
        assert!(w.fake.snapshot_names(vm1).is_empty());
        let muts = w.fake.mutations();
        let suspends = muts
            .iter()
            .filter(|c| c.starts_with("suspend_domain"))
            .count();
        let resumes = muts
            .iter()
            .filter(|c| c.starts_with("resume_domain"))
            .count();
        assert_eq!((suspends, resumes), (3, 3), "{muts:?}");
        // Every node is paused before the first snapshot is taken.
        let first_snapshot = muts
            .iter()
            .position(|c| c.starts_with("create_snapshot"))
            .unwrap();
        let last_suspend = muts
            .iter()
            .rposition(|c| c.starts_with("suspend_domain"))
            .unwrap();
        assert!(last_suspend < first_snapshot, "{muts:?}");
        assert!(snapshot::list(&w.env, LAB, None).await.unwrap().is_empty());

        // vm3 cannot be paused: the two paused before it run again, no snapshot is taken.
        let w = fake_lab::new();
        let plan = w.up(&[]).await.unwrap();
        w.fake.fail_object("suspend_domain", &plan.nodes[2].domain);
        assert!(save(&w, "initial").await.is_err());
        all_running(&w, &plan);
        assert!(
            !w.fake
                .calls()
                .iter()
                .any(|c| c.starts_with("create_snapshot"))
        );

        // A clean save: every node holds it, all run, the record lists the nodes.
        let w = fake_lab::new();
        let plan = w.up(&[]).await.unwrap();
        let info = save(&w, "initial").await.unwrap();
        assert_eq!(info.nodes, ["vm1", "vm2", "vm3"]);
        all_running(&w, &plan);
        for n in &plan.nodes {
            assert_eq!(w.fake.snapshot_names(&n.domain), ["initial"]);
        }
        let (msg, hint) = user_error(&save(&w, "initial").await.unwrap_err());
        assert!(msg.contains("already has a snapshot `initial`"), "{msg}");
        assert!(hint.contains("klab snapshot delete e2e initial"), "{hint}");
    }

    #[tokio::test]
    async fn snapshot_reset_reverts_every_node_resumes_them_and_sets_the_clocks() {
        let w = fake_lab::new();
        let plan = w.up(&[]).await.unwrap();
        save(&w, "initial").await.unwrap();
        w.fake.clear_calls();
        w.dials.lock().unwrap().clear();
        let out = snapshot::reset(&w.env, LAB, None, None, &w.lab.timeouts)
            .await
            .unwrap();
        assert_eq!(out.snapshot, "initial");
        assert_eq!(out.kubernetes_ready, None, "a plain VM lab");
        all_running(&w, &plan);
        let muts = w.fake.mutations();
        for n in &plan.nodes {
            assert!(
                muts.contains(&format!("revert_snapshot {}", n.domain)),
                "{muts:?}"
            );
            assert!(
                muts.contains(&format!("resume_domain {}", n.domain)),
                "{muts:?}"
            );
        }
        // Reverted together, then resumed together.
        let last_revert = muts
            .iter()
            .rposition(|c| c.starts_with("revert_snapshot"))
            .unwrap();
        let first_resume = muts
            .iter()
            .position(|c| c.starts_with("resume_domain"))
            .unwrap();
        assert!(last_revert < first_resume, "{muts:?}");
        // Each clock was read behind the host's and set.
        assert_eq!(out.clock_behind.len(), 3);
        assert!(
            out.clock_behind.values().all(|b| *b > GUEST_CLOCK),
            "{:?}",
            out.clock_behind
        );
        assert_eq!(w.dials.lock().unwrap().len(), 3);

        // A snapshot that was never taken: a clear error, nothing touched.
        let (msg, hint) = user_error(
            &snapshot::reset(&w.env, LAB, Some("nope"), None, &w.lab.timeouts)
                .await
                .unwrap_err(),
        );
        assert!(msg.contains("has no snapshot `nope`"), "{msg}");
        assert!(hint.contains("initial"), "{hint}");
    }

    #[tokio::test]
    async fn snapshot_revert_failing_partway_resumes_the_reverted_nodes_and_says_where_each_is() {
        let w = fake_lab::new();
        let plan = w.up(&[]).await.unwrap();
        save(&w, "initial").await.unwrap();
        w.fake.fail_object("revert_snapshot", &plan.nodes[1].domain);
        let (msg, hint) = user_error(
            &snapshot::reset(&w.env, LAB, None, None, &w.lab.timeouts)
                .await
                .unwrap_err(),
        );
        assert!(
            msg.contains("node vm2 cannot go back to `initial`"),
            "{msg}"
        );
        assert!(msg.contains("running again: vm1"), "{msg}");
        assert!(msg.contains("not touched: vm3"), "{msg}");
        assert!(hint.contains("klab reset e2e --to initial"), "{hint}");
        // vm1 was reverted (left paused by the revert) and is running again.
        all_running(&w, &plan);
        assert!(
            w.fake
                .calls()
                .contains(&format!("resume_domain {}", plan.nodes[0].domain))
        );
    }

    #[tokio::test]
    async fn snapshot_records_follow_the_domains_through_down_keep_state_and_rebuilds() {
        let w = fake_lab::new();
        let plan = w.up(&[]).await.unwrap();
        save(&w, "initial").await.unwrap();

        // A node rebuilt from a clean disk lost its half: list says so, reset refuses (naming the
        // node and the fix) and reverts nothing.
        let rebuilt = w.up(&["vm2"]).await.unwrap();
        assert!(w.fake.snapshot_names(&rebuilt.nodes[1].domain).is_empty());
        let listed = snapshot::list(&w.env, LAB, None).await.unwrap();
        assert_eq!(listed[0].missing_on, ["vm2"]);
        assert!(!listed[0].usable());
        w.fake.clear_calls();
        let (msg, hint) = user_error(
            &snapshot::reset(&w.env, LAB, None, None, &w.lab.timeouts)
                .await
                .unwrap_err(),
        );
        assert!(msg.contains("snapshot `initial` is gone from vm2"), "{msg}");
        assert!(hint.contains("klab snapshot save e2e initial"), "{hint}");
        assert!(
            !w.fake
                .calls()
                .iter()
                .any(|c| c.starts_with("revert_snapshot"))
        );
        all_running(&w, &plan);

        // `up` drops the records of rebuilt nodes and the other nodes' halves.
        let dropped =
            snapshot::forget_rebuilt(&w.env, LAB, &BTreeSet::from(["vm2".to_string()]), None)
                .await
                .unwrap();
        assert_eq!(dropped, ["initial"]);
        assert!(snapshot::list(&w.env, LAB, None).await.unwrap().is_empty());
        for n in &plan.nodes {
            assert!(w.fake.snapshot_names(&n.domain).is_empty(), "{}", n.name);
        }
        // Taken again under the same name.
        save(&w, "initial").await.unwrap();

        // A stale record (a half removed by hand) is replaced by the next save of that name.
        assert!(w.fake.drop_snapshot(&plan.nodes[2].domain, "initial"));
        let info = save(&w, "initial").await.unwrap();
        assert_eq!(info.nodes.len(), 3);
        for n in &plan.nodes {
            assert_eq!(w.fake.snapshot_names(&n.domain), ["initial"], "{}", n.name);
        }

        // down --keep-state: the domains went with their snapshots, and so do the records.
        down(
            &w.env,
            DownRequest {
                lab: LAB.into(),
                connect: None,
                dry_run: false,
                keep_state: true,
            },
        )
        .await
        .unwrap();
        assert!(snapshot::list(&w.env, LAB, None).await.unwrap().is_empty());
        let plan = w.up(&[]).await.unwrap();
        for n in &plan.nodes {
            assert!(w.fake.snapshot_names(&n.domain).is_empty());
        }
        // So `up --snapshot` would take `initial` again, and it can.
        save(&w, "initial").await.unwrap();
    }
}
