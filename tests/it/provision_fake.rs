//! The provisioning use case end to end without VMs: the HA fixture's phases through
//! `usecase::provision` with every node a scripted `RecordingRemote` behind a fake dialer. Checks
//! what the real test cannot cheaply: a failure's report, the journal after it, the resume that
//! skips every finished phase, the no-op rerun, the hand-over, owner-only state and redacted logs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use klab::exec::{BoxFuture, Dialer, JournalHandle, NodeSession};
use klab::plan::LabPlan;
use klab::plan::provision::PhaseId;
use klab::provision::RemoteError;
use klab::provision::recording::exit;
use klab::provision::ssh::SshTarget;
use klab::reconcile::journal::{Journal, Step};
use klab::render::Templates;
use klab::usecase::provision::{ProvisionInput, ProvisionOutcome, provision};
use klab::usecase::{Env, Error, Images, Paths};

const ADMIN_CONF: &str = "apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority-data: Q0E=
    server: https://10.10.1.11:6443
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: kubernetes-admin
  name: kubernetes-admin@kubernetes
current-context: kubernetes-admin@kubernetes
users:
- name: kubernetes-admin
  user:
    client-certificate-data: Q0VSVA==
    client-key-data: U0VDUkVUS0VZ
";

/// Fresh Debian 12 nodes ([`super::provision_plan::fresh_debian_node`]); `kubeadm init` fails while
/// `fail_init`.
struct ScriptedDialer {
    plan: LabPlan,
    fail_init: AtomicBool,
    /// The Node names the cluster lists, when not every node's.
    node_names: std::sync::Mutex<Option<String>>,
}

impl Dialer for ScriptedDialer {
    fn dial<'a>(
        &'a self,
        target: &'a SshTarget,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn NodeSession>, RemoteError>> {
        Box::pin(async move {
            let k = self.plan.kubernetes.as_ref().unwrap();
            let i = self
                .plan
                .nodes
                .iter()
                .position(|n| n.name == target.node)
                .unwrap();
            let node = &self.plan.nodes[i];
            let mut r = super::provision_plan::fresh_debian_node(
                node,
                i,
                &k.provision.phases,
                ADMIN_CONF,
                self.node_names.lock().unwrap().as_deref(),
            );
            if self.fail_init.load(Ordering::SeqCst) {
                r = r.on_prefix(
                    "sudo -n sh -c 'kubeadm init --config",
                    exit(1, "[preflight] boom\n"),
                );
            }
            Ok(Box::new(r) as Box<dyn NodeSession>)
        })
    }
}

struct NoImages(PathBuf);

impl Images for NoImages {
    fn local_images(&self) -> Result<Vec<klab::plan::LocalImage>, String> {
        Ok(Vec::new())
    }
    fn cache_root(&self) -> PathBuf {
        self.0.clone()
    }
    fn ensure(&self, _: &klab::plan::ImageSpec, _: bool) -> Result<(), String> {
        Ok(())
    }
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn phase<'a>(o: &'a ProvisionOutcome, id: &str) -> &'a klab::usecase::provision::PhaseSummary {
    o.phases.iter().find(|p| p.phase == id).unwrap()
}

#[tokio::test]
async fn a_failed_provisioning_resumes_at_its_phase_and_a_rerun_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = klab::plan::fixtures::ha_lab();
    let mut plan = klab::plan::plan(&lab, &klab::plan::fixtures::inputs(&lab.name));
    plan.kubernetes.as_mut().unwrap().calico_manifest = Some(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/calico/calico.yaml")
            .display()
            .to_string(),
    );
    let dialer = Arc::new(ScriptedDialer {
        plan: plan.clone(),
        fail_init: AtomicBool::new(true),
        node_names: std::sync::Mutex::new(None),
    });
    let (paths, env) = fake_env(tmp.path(), dialer.clone());
    let state = paths.state(&plan.lab);
    let names: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    let keys = state
        .ensure_keys(&names, klab::keys::generate_ed25519)
        .unwrap();
    let host_keys: BTreeMap<String, String> = keys
        .host_keys
        .iter()
        .map(|(n, k)| (n.clone(), k.public_openssh.clone()))
        .collect();
    let mut journal = Journal::new(&plan.lab);
    for n in &names {
        journal.reach(n, Step::Verified, "seed");
    }
    let journal = Arc::new(JournalHandle::new(Some(state.clone()), journal));
    let templates = Templates::builtin().unwrap();
    let timeouts = klab::model::Timeouts::default();
    let user_key = state.user_private_key().unwrap();
    let run = || {
        provision(
            &env,
            &state,
            ProvisionInput {
                plan: &plan,
                templates: &templates,
                timeouts: &timeouts,
                journal: Arc::clone(&journal),
                user_private_key: &user_key,
                host_keys: &host_keys,
                from: None,
                only: None,
                allow_unpinned_calico: false,
                route_check: None,
                jobs: 3,
            },
        )
    };

    // 1. kubeadm init fails: the error names node, phase, command, status, stderr and what next.
    let err = run().await.expect_err("kubeadm init fails");
    let Error::User { message, hint } = &err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains("cp1: phase `kubeadm-init`: `kubeadm init` failed with exit status 1"),
        "{message}"
    );
    assert!(message.contains("[preflight] boom"), "{message}");
    assert!(message.contains("next: read the output above"), "{message}");
    assert!(
        hint.as_deref().unwrap().contains("logs/cp1.log"),
        "{hint:?}"
    );
    let j = journal.snapshot();
    let done = |node: &str, ph: PhaseId| {
        j.nodes[node]
            .phases
            .get(ph.as_str())
            .is_some_and(|p| p.status == "done")
    };
    for n in &names {
        for ph in [
            PhaseId::Preflight,
            PhaseId::PackageRepo,
            PhaseId::Containerd,
        ] {
            assert!(done(n, ph), "{n}: {ph:?}");
        }
    }
    assert!(done("cp1", PhaseId::Vip) && !done("cp1", PhaseId::KubeadmInit));

    // 2. Fixed: the rerun starts at kubeadm-init; nothing before it touches a node again.
    dialer.fail_init.store(false, Ordering::SeqCst);
    let o = run().await.expect("provisioned").expect("a Kubernetes lab");
    assert!(o.changed);
    for id in [
        "preflight",
        "package-repo",
        "kubernetes-packages",
        "containerd",
        "vip",
    ] {
        let p = phase(&o, id);
        assert!(p.ran.is_empty() && p.already.is_empty(), "{id}: {p:?}");
        assert!(!p.journal.is_empty(), "{id}");
    }
    assert_eq!(phase(&o, "kubeadm-init").ran, ["cp1"]);
    assert_eq!(phase(&o, "join-control-plane").ran, ["cp2", "cp3"]);
    assert_eq!(phase(&o, "detect-os").ran.len(), names.len());
    assert_eq!(o.kubernetes_version.as_deref(), Some("1.36.4"));
    let ov = o.overhead.as_ref().expect("overhead measured");
    assert!(ov.commands > 0 && ov.share >= 0.0);

    // The hand-over: the lab's context, the VIP as server, owner-only.
    let kc = o.kubeconfig.clone().expect("kubeconfig");
    assert_eq!(mode(&kc), 0o600);
    let text = std::fs::read_to_string(&kc).unwrap();
    assert!(text.contains("server: https://10.10.1.100:6443"), "{text}");
    assert!(
        text.contains(&format!("current-context: {}", plan.lab)),
        "{text}"
    );

    // Secrets: owner-only on the host, absent from the logs, the plan and the journal.
    let dir = state.path();
    for f in [
        "cluster/ca.key",
        "cluster/bootstrap-token",
        "cluster/certificate-key",
        "cluster/vrrp-password",
        "logs/cp1.log",
        "logs/w1.log",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&dir.join("logs")), 0o700);
    let secrets: Vec<String> = [
        "cluster/bootstrap-token",
        "cluster/certificate-key",
        "cluster/vrrp-password",
    ]
    .iter()
    .map(|f| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_string()
    })
    .collect();
    for entry in std::fs::read_dir(dir.join("logs")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret reached a log");
        }
        assert!(
            !text.contains("U0VDUkVUS0VZ"),
            "the admin key reached a log"
        );
    }
    let log = std::fs::read_to_string(dir.join("logs/cp1.log")).unwrap();
    assert!(log.contains("kubeadm-init: kubeadm init"), "{log}");
    assert!(log.contains("exit 1 after"), "the failed run is in the log");

    // 3. Again: nothing to do; only the cluster check on the first control plane.
    let again = run().await.unwrap().unwrap();
    assert!(!again.changed);
    assert!(again.phases.iter().all(|p| p.ran.is_empty()));

    // 4. A node that left the cluster is named with the fix, never skipped.
    *dialer.node_names.lock().unwrap() = Some("cp1\ncp2\ncp3\nw1\n".into());
    let err = run().await.expect_err("w2 left");
    let Error::User { message, hint } = &err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains("w2 joined the cluster but is no longer in it"),
        "{message}"
    );
    assert!(
        hint.as_deref()
            .unwrap()
            .contains("--from join-workers --node NODE")
    );
}

/// Every command any node ran, in order, as (node, command); nodes in `down` do not answer.
struct LeaveDialer {
    log: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    down: Vec<String>,
}

struct Logged {
    node: String,
    inner: klab::provision::recording::RecordingRemote,
    log: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl NodeSession for Logged {
    fn exec<'a>(
        &'a self,
        command: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<klab::provision::CommandOutput, RemoteError>> {
        self.exec_input(command, None, timeout)
    }
    fn exec_input<'a>(
        &'a self,
        command: &'a str,
        stdin: Option<&'a [u8]>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<klab::provision::CommandOutput, RemoteError>> {
        self.log
            .lock()
            .unwrap()
            .push((self.node.clone(), command.to_string()));
        NodeSession::exec_input(&self.inner, command, stdin, timeout)
    }
    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

impl Dialer for LeaveDialer {
    fn dial<'a>(
        &'a self,
        target: &'a SshTarget,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn NodeSession>, RemoteError>> {
        Box::pin(async move {
            if self.down.contains(&target.node) {
                return Err(RemoteError::Connect {
                    node: target.node.clone(),
                    addr: target.addr.to_string(),
                    message: "no route to host".into(),
                });
            }
            let inner = klab::provision::recording::RecordingRemote::new(&target.node).on_prefix(
                "sudo -n sh -c 'list=$(kubectl",
                klab::provision::recording::ok(
                    "Member 91bc3c398fb3c146 removed from cluster ef37ad9dc622a7c4\n",
                ),
            );
            Ok(Box::new(Logged {
                node: target.node.clone(),
                inner,
                log: Arc::clone(&self.log),
            }) as Box<dyn NodeSession>)
        })
    }
}

#[tokio::test]
async fn leaving_nodes_are_drained_before_their_reset_and_a_silent_one_loses_its_etcd_member() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = klab::plan::fixtures::ha_lab();
    let plan = klab::plan::plan(&lab, &klab::plan::fixtures::inputs(&lab.name));
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (paths, env) = fake_env(
        tmp.path(),
        Arc::new(LeaveDialer {
            log: Arc::clone(&log),
            down: vec!["cp3".into()],
        }),
    );
    let state = paths.state(&plan.lab);
    let names: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    let keys = state
        .ensure_keys(&names, klab::keys::generate_ed25519)
        .unwrap();
    let host_keys: BTreeMap<String, String> = keys
        .host_keys
        .iter()
        .map(|(n, k)| (n.clone(), k.public_openssh.clone()))
        .collect();
    let user_key = state.user_private_key().unwrap();
    let timeouts = klab::model::Timeouts::default();
    let leaving = ["w2".to_string(), "cp2".to_string(), "cp3".to_string()];
    let notes = klab::usecase::provision::leave_cluster(
        &env, &plan, &plan, &leaving, &user_key, &host_keys, &timeouts,
    )
    .await
    .expect("the nodes leave");

    let what = |(node, cmd): &(String, String)| -> String {
        let kind = if cmd.contains(" drain ") {
            "drain"
        } else if cmd.contains("kubeadm reset -f") {
            "reset"
        } else if cmd.contains("member remove") {
            "remove-member"
        } else if cmd.contains(" delete node ") {
            "delete"
        } else {
            "other"
        };
        let about = ["w2", "cp2", "cp3"]
            .into_iter()
            .find(|n| cmd.contains(&format!(" {n} ")) || cmd.contains(&format!("n={n} ")))
            .unwrap_or("-");
        format!("{node}: {kind} {about}")
    };
    let steps: Vec<String> = log.lock().unwrap().iter().map(what).collect();
    assert_eq!(
        steps,
        [
            // A worker: drained while it runs, reset, deleted.
            "cp1: drain w2",
            "w2: reset -",
            "cp1: delete w2",
            // A control plane that answers: the same, and its etcd member made sure of.
            "cp1: drain cp2",
            "cp2: reset -",
            "cp1: remove-member cp2",
            "cp1: delete cp2",
            // One that does not answer: no drain, no reset; its member removed on a survivor.
            "cp1: remove-member cp3",
            "cp1: delete cp3",
        ]
    );
    let etcd_exec = log
        .lock()
        .unwrap()
        .iter()
        .find(|(_, c)| c.contains("member remove"))
        .map(|(_, c)| c.clone())
        .unwrap();
    assert!(
        etcd_exec.contains("exec etcd-cp1 -- etcdctl"),
        "{etcd_exec}"
    );
    let text = notes.join("\n");
    assert!(
        text.contains("cp3 does not answer") && text.contains("not drained and not reset"),
        "{text}"
    );
    assert!(
        text.contains("its etcd member is removed on the first control plane"),
        "{text}"
    );
    assert!(
        text.contains("cp3: etcd: Member 91bc3c398fb3c146 removed from cluster"),
        "{text}"
    );
}

/// State under `dir`, no hypervisor, SSH through `dialer`.
fn fake_env(dir: &std::path::Path, dialer: Arc<dyn klab::exec::Dialer>) -> (Paths, Env) {
    let paths = Paths {
        state_root: dir.join("labs"),
        data_root: dir.join("data"),
    };
    let env = Env {
        connector: Arc::new(|uri: &str| -> Result<Arc<dyn klab::backend::Backend>, _> {
            Err(klab::backend::BackendError::Other(format!(
                "no hypervisor in this test ({uri})"
            )))
        }),
        dialer,
        images: Arc::new(NoImages(dir.join("cache"))),
        paths: paths.clone(),
        printer: klab::output::Printer::new(klab::cli::OutputFormat::Json),
        call_timeout: Duration::from_secs(5),
        host_checks: false,
    };
    (paths, env)
}
