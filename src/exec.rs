//! Applies reconcile actions through a [`Backend`]. Side effects start here.
//!
//! Networks and the pool are created first, one at a time; then each node runs its own pipeline
//! (overlay → seed → define+start → pinned SSH → cloud-init → verify) with at most `jobs` nodes in
//! flight, recording every step it reaches in the lab's journal. Every backend call runs inside
//! `spawn_blocking` under a bound ([`call`]); every wait has the lab's timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::backend::{Backend, BackendError};
use crate::model::Timeouts;
use crate::observed::DomainState;
use crate::output::Printer;
use crate::plan::{LabPlan, NodeSpec};
use crate::provision::ssh::{SshSession, SshTarget, wait_for_ssh};
use crate::provision::{CommandOutput, Remote, RemoteError};
use crate::reconcile::Action;
use crate::reconcile::journal::{Journal, Step};
use crate::render::RenderedLab;
use crate::state::StateDir;

/// How long one libvirt call may take before klab gives up on it (a wedged libvirtd otherwise
/// hangs klab for good). Generous: a libvirtd that re-probes QEMU's capabilities on every define
/// (seen on loaded TCG hosts) takes over a minute for a healthy `define`.
/// `KLAB_LIBVIRT_TIMEOUT` overrides it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the domain's state is polled while waiting for a node to answer.
const DOMAIN_POLL: Duration = Duration::from_secs(2);

/// Run one backend call off the async runtime, bounded by [`CALL_TIMEOUT`]. `what` names the
/// call and its object for the error (`define domain klab-x-node1`).
pub async fn call<T: Send + 'static>(
    backend: &Arc<dyn Backend>,
    what: impl Into<String>,
    f: impl FnOnce(&dyn Backend) -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    call_within(backend, what, CALL_TIMEOUT, f).await
}

/// [`call`] with an explicit bound.
pub async fn call_within<T: Send + 'static>(
    backend: &Arc<dyn Backend>,
    what: impl Into<String>,
    bound: Duration,
    f: impl FnOnce(&dyn Backend) -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    let b = Arc::clone(backend);
    let task = tokio::task::spawn_blocking(move || f(b.as_ref()));
    match tokio::time::timeout(bound, task).await {
        Ok(joined) => {
            joined.map_err(|e| BackendError::Other(format!("backend task failed: {e}")))?
        }
        // The blocking thread cannot be cancelled; it finishes (or not) on its own.
        Err(_) => Err(BackendError::Unresponsive {
            backend: backend.kind(),
            what: what.into(),
            after: bound,
            uri: backend.uri(),
        }),
    }
}

/// Boxed, sendable future (the seams below are object-safe so tests can inject doubles).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A logged-in connection to one node, as the bring-up uses it.
pub trait NodeSession: Send + Sync {
    fn exec<'a>(
        &'a self,
        command: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, RemoteError>>;
    /// Like `exec`, with bytes on the command's stdin (the provisioner writes files this way).
    fn exec_input<'a>(
        &'a self,
        command: &'a str,
        stdin: Option<&'a [u8]>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, RemoteError>>;
    fn close(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// How the bring-up reaches a node: waits until the node answers with its pinned host key.
pub trait Dialer: Send + Sync {
    fn dial<'a>(
        &'a self,
        target: &'a SshTarget,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn NodeSession>, RemoteError>>;
}

/// The real one: russh with the pinned host key, retrying until the timeout.
pub struct SshDialer;

impl Dialer for SshDialer {
    fn dial<'a>(
        &'a self,
        target: &'a SshTarget,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn NodeSession>, RemoteError>> {
        Box::pin(async move {
            let mut attempts = 0u32;
            let s = wait_for_ssh(target, timeout, |e| {
                if let crate::provision::ssh::SshWaitEvent::Retrying { .. } = e {
                    attempts += 1;
                }
            })
            .await?;
            tracing::debug!(node = %target.node, failed_attempts = attempts, "ssh connected");
            Ok(Box::new(s) as Box<dyn NodeSession>)
        })
    }
}

impl NodeSession for SshSession {
    fn exec<'a>(
        &'a self,
        command: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, RemoteError>> {
        Box::pin(Remote::exec(self, command, None, timeout))
    }
    fn exec_input<'a>(
        &'a self,
        command: &'a str,
        stdin: Option<&'a [u8]>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, RemoteError>> {
        Box::pin(Remote::exec(self, command, stdin, timeout))
    }
    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(SshSession::close(*self))
    }
}

impl NodeSession for crate::provision::recording::RecordingRemote {
    fn exec<'a>(
        &'a self,
        command: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, RemoteError>> {
        Box::pin(Remote::exec(self, command, None, timeout))
    }
    fn exec_input<'a>(
        &'a self,
        command: &'a str,
        stdin: Option<&'a [u8]>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, RemoteError>> {
        Box::pin(Remote::exec(self, command, stdin, timeout))
    }
    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The lab's journal, shared by the node tasks and saved after every change.
pub struct JournalHandle {
    state: Option<StateDir>,
    journal: Mutex<Journal>,
}

impl JournalHandle {
    pub fn new(state: Option<StateDir>, journal: Journal) -> Self {
        Self {
            state,
            journal: Mutex::new(journal),
        }
    }

    pub fn snapshot(&self) -> Journal {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the journal and write it, under the lock so writes stay in order.
    pub fn update(&self, f: impl FnOnce(&mut Journal)) -> Result<(), ExecError> {
        let mut j = self.lock();
        f(&mut j);
        if let Some(st) = &self.state {
            st.save_journal(&j)
                .map_err(|e| ExecError::Journal(e.to_string()))?;
        }
        Ok(())
    }
}

/// Where the route to a node's address leaves the host, checked before SSH (local URIs only):
/// `Err(message)` when it does not leave through the lab's own bridge.
pub type RouteCheck = Arc<dyn Fn(Ipv4Addr, &str) -> Result<(), String> + Send + Sync>;

/// Test hook: with `KLAB_TEST_KILL_AT=<point>` the process aborts at that point (no cleanup, no
/// destructors), like a SIGKILL. Used by the crash tests only.
pub fn crash_point(point: &str) {
    if std::env::var("KLAB_TEST_KILL_AT").as_deref() == Ok(point) {
        eprintln!("klab: KLAB_TEST_KILL_AT={point}: aborting here");
        std::process::abort();
    }
}

/// A node that did not come up: which step failed, why, and what its console said last.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeFailure {
    pub node: String,
    pub step: String,
    pub error: String,
    pub console_tail: Vec<String>,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node `{}` failed at {}: {}",
            self.node, self.step, self.error
        )?;
        if !self.console_tail.is_empty() {
            write!(f, "\n  last lines of its serial console:")?;
            for l in &self.console_tail {
                write!(f, "\n    | {l}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot record progress in the lab's journal: {0}")]
    Journal(String),
    #[error("{}", .0.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("\n"))]
    Nodes(Vec<NodeFailure>),
}

/// Timings of one node's bring-up, for the summary and `--output json`.
#[derive(Debug, Clone, serde::Serialize, Default)]
pub struct NodeReport {
    pub node: String,
    pub created: bool,
    pub ssh_seconds: Option<f64>,
    pub ready_seconds: Option<f64>,
    pub cloud_init_warnings: bool,
    /// Every step with the seconds since the node's pipeline started.
    pub timeline: Vec<(String, f64)>,
}

pub struct UpContext {
    pub backend: Arc<dyn Backend>,
    pub plan: Arc<LabPlan>,
    pub rendered: Arc<RenderedLab>,
    pub user_private_key: Arc<String>,
    /// Pinned host public key per node.
    pub host_keys: Arc<BTreeMap<String, String>>,
    pub timeouts: Timeouts,
    pub printer: Printer,
    pub jobs: usize,
    pub dialer: Arc<dyn Dialer>,
    pub journal: Arc<JournalHandle>,
    /// sha256 of each node's current seed.
    pub seed_hashes: Arc<BTreeMap<String, String>>,
    pub route_check: Option<RouteCheck>,
    /// Bound for each backend call.
    pub call_timeout: Duration,
    /// Follow each node's serial console log (local hypervisor) for cloud-init's final message
    /// before the first SSH attempt; otherwise SSH is retried from boot on.
    pub follow_console: bool,
}

/// Apply `up` actions. Pool/network actions first (in order), then node pipelines in parallel.
pub async fn apply_up(ctx: &UpContext, actions: &[Action]) -> Result<Vec<NodeReport>, ExecError> {
    let mut modes: BTreeMap<String, NodeMode> = BTreeMap::new();
    let mut wait: Vec<String> = Vec::new();
    let bound = ctx.call_timeout;
    for a in actions {
        match a {
            Action::CreatePool { pool } => {
                let xml = ctx.rendered.pool.clone().unwrap_or_default();
                let (name, lab) = (pool.clone(), ctx.plan.lab.clone());
                // Recorded first: a crash between defining and tagging the pool must not leave a
                // pool the next run refuses as foreign.
                ctx.journal.update(|j| j.pool = Some(name.clone()))?;
                ctx.printer.note(format!("creating storage pool {name}"));
                call_within(
                    &ctx.backend,
                    format!("create pool {name}"),
                    bound,
                    move |b| b.ensure_pool(&name, &xml, &lab),
                )
                .await?;
            }
            Action::CreateNetwork { network } | Action::StartNetwork { network } => {
                let xml = ctx
                    .rendered
                    .networks
                    .iter()
                    .find(|(n, _)| n == network)
                    .map(|(_, x)| x.clone())
                    .unwrap_or_default();
                let name = network.clone();
                ctx.printer.note(format!("starting network {name}"));
                call_within(
                    &ctx.backend,
                    format!("start network {name}"),
                    bound,
                    move |b| b.ensure_network(&name, &xml),
                )
                .await?;
            }
            Action::RemoveDomain { domain, reason } => {
                ctx.printer
                    .note(format!("removing domain {domain} ({reason})"));
                if let Some(n) = ctx.plan.nodes.iter().find(|n| &n.domain == domain) {
                    ctx.journal.update(|j| j.forget(&n.name))?;
                }
                let name = domain.clone();
                call_within(
                    &ctx.backend,
                    format!("remove domain {name}"),
                    bound,
                    move |b| b.remove_domain(&name),
                )
                .await?;
            }
            Action::RemoveVolume { pool: p, volume } => {
                let (p, v) = (p.clone(), volume.clone());
                call_within(
                    &ctx.backend,
                    format!("remove volume {p}/{v}"),
                    bound,
                    move |b| b.remove_volume(&p, &v),
                )
                .await?;
            }
            Action::RemoveNetwork { network } => {
                ctx.printer.note(format!("removing network {network}"));
                let name = network.clone();
                call_within(
                    &ctx.backend,
                    format!("remove network {name}"),
                    bound,
                    move |b| b.remove_network(&name),
                )
                .await?;
            }
            Action::RemovePool { pool: p } => {
                let name = p.clone();
                call_within(
                    &ctx.backend,
                    format!("remove pool {name}"),
                    bound,
                    move |b| b.remove_pool(&name),
                )
                .await?;
            }
            Action::CreateNode { node } => {
                modes.insert(node.clone(), NodeMode::Create);
            }
            Action::StartNode { node } => {
                modes.entry(node.clone()).or_insert(NodeMode::Start);
            }
            Action::RestartNode { node, .. } => {
                modes.entry(node.clone()).or_insert(NodeMode::Restart);
            }
            Action::WaitNode { node } => wait.push(node.clone()),
        }
    }

    let width = ctx
        .plan
        .nodes
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(4);
    let sem = Arc::new(Semaphore::new(ctx.jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let journal_now = ctx.journal.snapshot();
    for node in ctx
        .plan
        .nodes
        .iter()
        .filter(|n| modes.contains_key(&n.name) || wait.contains(&n.name))
    {
        let mode = modes.get(&node.name).copied().unwrap_or(NodeMode::WaitOnly);
        let current = ctx.seed_hashes.get(&node.name).cloned().unwrap_or_default();
        // A node not rebuilt now still runs the seed it was built with: progress is recorded
        // against that one, so a drifted node stays reported as drifted.
        let seed_hash = match (mode, journal_now.nodes.get(&node.name)) {
            (NodeMode::Create, _) | (_, None) => current,
            (_, Some(r)) => r.seed_hash.clone(),
        };
        let progress = ctx.printer.node(&node.name, width);
        progress.step("queued");
        let sem = Arc::clone(&sem);
        let job = NodeJob {
            backend: Arc::clone(&ctx.backend),
            plan: Arc::clone(&ctx.plan),
            rendered: Arc::clone(&ctx.rendered),
            user_private_key: Arc::clone(&ctx.user_private_key),
            host_key: ctx.host_keys.get(&node.name).cloned().unwrap_or_default(),
            timeouts: ctx.timeouts.clone(),
            node: node.clone(),
            wait: wait.contains(&node.name),
            dialer: Arc::clone(&ctx.dialer),
            journal: Arc::clone(&ctx.journal),
            seed_hash,
            route_check: ctx.route_check.clone(),
            call_timeout: ctx.call_timeout,
            follow_console: ctx.follow_console,
            timeline: Mutex::new(Vec::new()),
            t0: Instant::now(),
        };
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = job.run(mode, &progress).await;
            match &r {
                Ok(rep) => progress.done(&match rep.ready_seconds {
                    Some(s) => format!("ready in {s:.1}s"),
                    None => "started".to_string(),
                }),
                Err(f) => progress.fail(&format!("{}: {}", f.step, f.error)),
            }
            r
        });
    }
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(f)) => failures.push(f),
            Err(e) => failures.push(NodeFailure {
                node: "?".into(),
                step: "internal".into(),
                error: e.to_string(),
                console_tail: vec![],
            }),
        }
    }
    if !failures.is_empty() {
        failures.sort_by(|a, b| a.node.cmp(&b.node));
        let logs: Vec<String> = failures
            .iter()
            .map(|f| {
                ctx.plan
                    .node(&f.node)
                    .map(|n| n.console_log.clone())
                    .unwrap_or_default()
            })
            .collect();
        let tails = tokio::task::spawn_blocking(move || {
            logs.iter().map(|l| console_tail(l, 25)).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (f, tail) in failures.iter_mut().zip(tails) {
            f.console_tail = tail;
        }
        return Err(ExecError::Nodes(failures));
    }
    reports.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(reports)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NodeMode {
    Create,
    Start,
    Restart,
    WaitOnly,
}

struct NodeJob {
    backend: Arc<dyn Backend>,
    plan: Arc<LabPlan>,
    rendered: Arc<RenderedLab>,
    user_private_key: Arc<String>,
    host_key: String,
    timeouts: Timeouts,
    node: NodeSpec,
    wait: bool,
    dialer: Arc<dyn Dialer>,
    journal: Arc<JournalHandle>,
    seed_hash: String,
    route_check: Option<RouteCheck>,
    call_timeout: Duration,
    follow_console: bool,
    timeline: Mutex<Vec<(String, f64)>>,
    t0: Instant,
}

/// What following a node's serial console gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConsoleWait {
    /// cloud-init printed its final message: one SSH login verifies the node.
    Finished,
    /// No console log to follow (missing, or stays empty): wait on SSH instead.
    Unavailable,
    /// The log grew but never said "finished" within the SSH timeout: wait on SSH instead.
    Silent,
    /// The guest's kernel reported a task blocked during boot, before cloud-init finished: under
    /// TCG a virtio disk request is sometimes never answered and the boot never ends.
    Hung,
}

/// How long an empty or missing console log is given before klab falls back to SSH.
const CONSOLE_GRACE: Duration = Duration::from_secs(20);
const CONSOLE_POLL: Duration = Duration::from_millis(500);

/// cloud-init's `final_message` (`Cloud-init v. 22.4.2 finished at …`) on the console.
pub fn console_says_finished(text: &str) -> bool {
    text.lines()
        .any(|l| l.contains("Cloud-init v.") && l.contains(" finished at "))
}

/// The kernel's hung-task report (`INFO: task NAME:PID blocked for more than N seconds.`) for a
/// task blocked at least 240 s (the kernel repeats it every 120 s while the task stays blocked): the
/// boot is stuck on I/O that will not complete, not merely slow on a loaded host.
pub fn console_says_hung(text: &str) -> bool {
    const STUCK_SECS: u64 = 240;
    text.lines().any(|l| {
        l.contains("INFO: task ")
            && l.split(" blocked for more than ")
                .nth(1)
                .is_some_and(|rest| {
                    rest.split_whitespace()
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .is_some_and(|n| n >= STUCK_SECS)
                })
    })
}

impl NodeJob {
    fn fail(&self, step: &str, error: impl ToString) -> NodeFailure {
        NodeFailure {
            node: self.node.name.clone(),
            step: step.to_string(),
            error: error.to_string(),
            // Filled in by `apply_up`, off the async runtime.
            console_tail: Vec::new(),
        }
    }

    /// Show the step, put it on the node's timeline (`-v` logs it with its time).
    fn step(&self, progress: &crate::output::NodeProgress, step: &str) {
        progress.step(step);
        let t = self.t0.elapsed().as_secs_f64();
        tracing::info!(node = %self.node.name, "{step} at {t:.1}s");
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((step.to_string(), (t * 10.0).round() / 10.0));
    }

    fn reached(&self, step: Step) -> Result<(), NodeFailure> {
        self.journal
            .update(|j| j.reach(&self.node.name, step, &self.seed_hash))
            .map_err(|e| self.fail("journal", e))
    }

    async fn call<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce(&dyn Backend) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        call_within(&self.backend, what, self.call_timeout, f).await
    }

    async fn run(
        &self,
        mode: NodeMode,
        progress: &crate::output::NodeProgress,
    ) -> Result<NodeReport, NodeFailure> {
        let mut report = NodeReport {
            node: self.node.name.clone(),
            created: mode == NodeMode::Create,
            ..Default::default()
        };
        let r = self.pipeline(mode, progress, &mut report).await;
        report.timeline = self
            .timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        r.map(|()| report)
    }

    async fn pipeline(
        &self,
        mode: NodeMode,
        progress: &crate::output::NodeProgress,
        report: &mut NodeReport,
    ) -> Result<(), NodeFailure> {
        let pool = self.plan.pool.name.clone();
        let domain = self.node.domain.clone();
        let rendered = self
            .rendered
            .nodes
            .iter()
            .find(|n| n.name == self.node.name)
            .cloned()
            .ok_or_else(|| self.fail("render", "no rendered files for this node"))?;
        match mode {
            NodeMode::Create => {
                self.step(progress, "creating disk");
                let (p, xml) = (pool.clone(), rendered.overlay_xml.clone());
                self.call(
                    format!("create volume {pool}/{}", self.node.overlay.name),
                    move |b| b.create_volume(&p, &xml),
                )
                .await
                .map_err(|e| self.fail("creating the overlay disk", e))?;
                self.reached(Step::Overlay)?;
                crash_point("seed-upload");
                self.step(progress, "creating seed");
                let (p, name, files) = (
                    pool.clone(),
                    self.node.seed.name.clone(),
                    rendered.seed.clone(),
                );
                self.call(format!("upload volume {pool}/{name}"), move |b| {
                    let seed = crate::seed::build_vfat_seed(&[
                        ("meta-data", files.meta_data.as_bytes()),
                        ("user-data", files.user_data.as_bytes()),
                        ("network-config", files.network_config.as_bytes()),
                    ])
                    .map_err(|e| BackendError::Other(format!("building the seed image: {e}")))?;
                    b.upload_volume(&p, &name, &seed)
                })
                .await
                .map_err(|e| self.fail("creating the cloud-init seed", e))?;
                self.reached(Step::Seed)?;
                self.step(progress, "booting");
                let (name, xml) = (domain.clone(), rendered.domain_xml.clone());
                self.call(format!("define and start domain {domain}"), move |b| {
                    b.define_and_start(&name, &xml)
                })
                .await
                .map_err(|e| self.fail("defining and starting the domain", e))?;
                self.reached(Step::Started)?;
            }
            NodeMode::Start | NodeMode::Restart => {
                if mode == NodeMode::Restart {
                    self.step(progress, "restarting");
                    self.stop_domain("stopping the domain").await?;
                }
                self.step(progress, "booting");
                self.start_domain("starting the domain").await?;
                self.reached(Step::Started)?;
            }
            NodeMode::WaitOnly => {
                // Running but not verified: start over from "started" for this seed.
                self.journal
                    .update(|j| {
                        j.reach(&self.node.name, Step::Started, &self.seed_hash);
                    })
                    .map_err(|e| self.fail("journal", e))?;
            }
        }
        crash_point("booting");
        if !self.wait {
            return Ok(());
        }
        let nic1_bridge = self
            .node
            .nics
            .first()
            .and_then(|nic| {
                self.plan
                    .networks
                    .iter()
                    .find(|n| n.name == nic.libvirt_network)
            })
            .map(|n| n.bridge.clone())
            .unwrap_or_default();
        if let Some(check) = &self.route_check {
            check(self.node.ssh_address, &nic1_bridge).map_err(|e| self.fail("ssh", e))?;
        }
        if self.follow_console {
            self.step(progress, "console");
            let mut seen = tokio::select! {
                w = self.wait_console() => w,
                gone = self.watch_domain() => return Err(self.fail("boot", gone)),
            };
            if seen == ConsoleWait::Hung {
                // One hard reset: nothing of the lab runs yet, and what cloud-init wrote before
                // is healed by its bootcmd. A second hang is a failure with the console's tail.
                tracing::warn!(node = %self.node.name, "the guest's kernel reports a task blocked during boot; resetting the node once");
                self.step(progress, "boot hung: resetting");
                self.stop_domain("resetting a hung boot").await?;
                self.start_domain("resetting a hung boot").await?;
                self.step(progress, "console");
                seen = tokio::select! {
                    w = self.wait_console() => w,
                    gone = self.watch_domain() => return Err(self.fail("boot", gone)),
                };
                if seen == ConsoleWait::Hung {
                    return Err(self.fail(
                        "boot",
                        "the guest's kernel reported a blocked task during boot twice (after one reset); under TCG a virtio disk request was never answered",
                    ));
                }
            }
            tracing::info!(node = %self.node.name, "console: {seen:?}");
        }
        self.step(progress, "ssh");
        let target = SshTarget {
            node: self.node.name.clone(),
            addr: SocketAddr::from((self.node.ssh_address, 22)),
            user: self.node.user.clone(),
            user_private_key: self.user_private_key.as_str().to_string(),
            host_public_key: self.host_key.clone(),
        };
        let session = tokio::select! {
            r = self.dialer.dial(&target, self.timeouts.ssh) => r.map_err(|e| self.fail("ssh", e))?,
            gone = self.watch_domain() => return Err(self.fail("ssh", gone)),
        };
        report.ssh_seconds = Some(self.t0.elapsed().as_secs_f64());
        self.reached(Step::Ssh)?;
        self.step(progress, "cloud-init");
        let out = session
            .exec(
                crate::verify::CLOUD_INIT_WAIT_COMMAND,
                self.timeouts.cloud_init,
            )
            .await
            .map_err(|e| self.fail("cloud-init", e))?;
        match crate::verify::parse_cloud_init(&out.stdout) {
            crate::verify::CloudInitOutcome::Done => {}
            crate::verify::CloudInitOutcome::Warnings(w) => {
                report.cloud_init_warnings = true;
                tracing::warn!(node = %self.node.name, "cloud-init finished with recoverable errors: {}", w.join("; "));
            }
            crate::verify::CloudInitOutcome::Failed(errors) => {
                let detail = session
                    .exec(
                        "tail -n 20 /var/log/cloud-init-output.log",
                        Duration::from_secs(30),
                    )
                    .await
                    .map(|o| o.stdout)
                    .unwrap_or_default();
                return Err(self.fail(
                    "cloud-init",
                    format!(
                        "cloud-init reported errors:\n{}\n  /var/log/cloud-init-output.log ends with:\n{}",
                        indent(&errors.join("\n")),
                        indent(&detail)
                    ),
                ));
            }
        }
        self.reached(Step::CloudInit)?;
        crash_point("verifying");
        self.step(progress, "verifying");
        let probe = session
            .exec(crate::verify::PROBE_COMMAND, Duration::from_secs(60))
            .await
            .map_err(|e| self.fail("verifying", e))?;
        let problems = crate::verify::check(&self.node, &crate::verify::parse_probe(&probe.stdout));
        if !problems.is_empty() {
            return Err(self.fail(
                "verifying the network",
                format!(
                    "the node is not configured as planned:\n{}",
                    indent(&problems.join("\n"))
                ),
            ));
        }
        session.close().await;
        self.reached(Step::Verified)?;
        report.ready_seconds = Some(self.t0.elapsed().as_secs_f64());
        self.step(progress, "verified");
        Ok(())
    }

    /// Stops (destroys) the node's domain; a failure is reported as `step`.
    async fn stop_domain(&self, step: &str) -> Result<(), NodeFailure> {
        let (domain, name) = (self.node.domain.clone(), self.node.domain.clone());
        self.call(format!("stop domain {domain}"), move |b| {
            b.stop_domain(&name)
        })
        .await
        .map_err(|e| self.fail(step, e))
    }

    /// Starts the node's domain; a failure is reported as `step`.
    async fn start_domain(&self, step: &str) -> Result<(), NodeFailure> {
        let (domain, name) = (self.node.domain.clone(), self.node.domain.clone());
        self.call(format!("start domain {domain}"), move |b| {
            b.start_domain(&name)
        })
        .await
        .map_err(|e| self.fail(step, e))
    }

    /// Follows the serial console log (truncated by libvirt at every domain start, so it holds
    /// this boot only) until cloud-init's final message, without touching the guest.
    async fn wait_console(&self) -> ConsoleWait {
        let path = PathBuf::from(&self.node.console_log);
        let start = Instant::now();
        loop {
            let p = path.clone();
            let (len, finished, hung) =
                tokio::task::spawn_blocking(move || match std::fs::read(&p) {
                    Ok(bytes) => {
                        let text = String::from_utf8_lossy(&bytes);
                        (
                            bytes.len() as u64,
                            console_says_finished(&text),
                            console_says_hung(&text),
                        )
                    }
                    Err(_) => (0, false, false),
                })
                .await
                .unwrap_or((0, false, false));
            if finished {
                return ConsoleWait::Finished;
            }
            if hung {
                return ConsoleWait::Hung;
            }
            let waited = start.elapsed();
            if len == 0 && waited >= CONSOLE_GRACE {
                return ConsoleWait::Unavailable;
            }
            if waited >= self.timeouts.ssh {
                return ConsoleWait::Silent;
            }
            tokio::time::sleep(CONSOLE_POLL).await;
        }
    }

    /// Resolves when the node's domain is gone or stopped, so a node deleted while klab waits
    /// for it is reported at once instead of after the SSH timeout.
    async fn watch_domain(&self) -> String {
        loop {
            tokio::time::sleep(DOMAIN_POLL).await;
            let name = self.node.domain.clone();
            match self
                .call(format!("read state of domain {name}"), move |b| {
                    b.domain_state(&name)
                })
                .await
            {
                Ok(None) => {
                    return format!(
                        "domain {} disappeared while klab waited for the node",
                        self.node.domain
                    );
                }
                Ok(Some(st @ (DomainState::Shutoff | DomainState::Crashed))) => {
                    return format!(
                        "domain {} is {} while klab waited for the node",
                        self.node.domain,
                        format!("{st:?}").to_lowercase()
                    );
                }
                Ok(Some(_)) => {}
                Err(e) => tracing::debug!(domain = %self.node.domain, "polling state: {e}"),
            }
        }
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The last `n` printable lines of a serial console log (empty if unreadable, e.g. remote URI).
pub fn console_tail(path: &str, n: usize) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            l.chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect::<String>()
        })
        .map(|l| strip_ansi(&l))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

fn strip_ansi(s: &str) -> String {
    // Control characters are already gone, so escape sequences show up as `[0;32m`-like runs.
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '['
            && chars
                .peek()
                .is_some_and(|d| d.is_ascii_digit() || *d == ';' || *d == '?')
        {
            let mut buf = String::from("[");
            while let Some(&d) = chars.peek() {
                buf.push(d);
                chars.next();
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            if !buf.chars().last().is_some_and(|d| d.is_ascii_alphabetic()) {
                out.push_str(&buf);
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Remove objects in the order given (teardown).
pub async fn apply_down(
    backend: &Arc<dyn Backend>,
    printer: &Printer,
    actions: &[Action],
) -> Result<(), BackendError> {
    for a in actions {
        printer.note(format!("  {}", a.describe()));
        match a.clone() {
            Action::RemoveDomain { domain, .. } => {
                call(backend, format!("remove domain {domain}"), move |b| {
                    b.remove_domain(&domain)
                })
                .await?
            }
            Action::RemoveVolume { pool, volume } => {
                call(
                    backend,
                    format!("remove volume {pool}/{volume}"),
                    move |b| b.remove_volume(&pool, &volume),
                )
                .await?
            }
            Action::RemoveNetwork { network } => {
                call(backend, format!("remove network {network}"), move |b| {
                    b.remove_network(&network)
                })
                .await?
            }
            Action::RemovePool { pool } => {
                call(backend, format!("remove pool {pool}"), move |b| {
                    b.remove_pool(&pool)
                })
                .await?
            }
            other => {
                return Err(BackendError::Other(format!(
                    "internal: `{}` is not a teardown action",
                    other.describe()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_blocked_for_four_minutes_is_a_hung_boot_and_two_minutes_is_not() {
        // As a TCG guest printed it when its seed disk's virtio request was never answered.
        let first = "[    5.848748]  vdb:\r\n[  242.939965] INFO: task kworker/0:1:17 blocked for more than 120 seconds.\r\n[  242.940309]       Not tainted 6.1.0-50-amd64 #1 Debian 6.1.176-1\r\n";
        assert!(!console_says_hung(first), "one report may be a slow host");
        let again = format!(
            "{first}[  363.772044] INFO: task kworker/0:1:17 blocked for more than 241 seconds.\r\n"
        );
        assert!(console_says_hung(&again));
        assert!(!console_says_hung("blocked for more than 600 seconds"));
        assert!(!console_says_hung(""));
    }

    #[test]
    fn cloud_inits_final_message_is_recognised_on_the_console() {
        let log = "[  OK  ] Started ssh.service\r\n[   41.2] cloud-init[612]: Cloud-init v. 22.4.2 finished at Tue, 01 Dec 2026 20:41:02 +0000. Datasource DataSourceNoCloud [seed=/dev/vdb][dsmode=net].  Up 41.18 seconds\r\n";
        assert!(console_says_finished(log));
        assert!(!console_says_finished(
            "cloud-init[401]: Cloud-init v. 22.4.2 running 'modules:final' at Tue"
        ));
        assert!(!console_says_finished(""));
    }

    #[test]
    fn console_tail_strips_escape_sequences_and_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        std::fs::write(&p, "a\n\x1b[0;32mOK\x1b[0m started\nb\n\nc\n").unwrap();
        let t = console_tail(p.to_str().unwrap(), 3);
        assert_eq!(t, vec!["OK started", "b", "c"]);
        assert!(console_tail("/nonexistent/x.log", 3).is_empty());
    }
}
