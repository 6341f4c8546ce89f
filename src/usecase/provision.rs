//! `provision`: the Kubernetes half of `klab up` (and all of `klab provision`). Runs the plan's
//! phases over one pinned SSH session per node with the cluster identity klab makes once (kept 0600
//! in the state directory), the Calico manifest checked on the host, and a journal entry per
//! finished node and phase carrying the hash of what it applied — a killed run resumes at the first
//! unfinished phase, a changed template reruns its phase. Every node gets a 0600 log in the state
//! directory; the admin kubeconfig is handed over at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Env, Error, chain};
use crate::exec::{JournalHandle, NodeSession, RouteCheck, crash_point};
use crate::model::Timeouts;
use crate::output::NodeProgress;
use crate::plan::LabPlan;
use crate::plan::provision::{NodePhase, Phase, PhaseId, ProvisionPlan, value};
use crate::plan::secret::{REDACTED, Secret};
use crate::provision::runner::{Event, NodeOutcome, Runner, Val, Values, write_file_script};
use crate::provision::ssh::SshTarget;
use crate::provision::{CommandOutput, Remote, RemoteError, identity, stderr_tail};
use crate::reconcile::journal::PhaseRecord;
use crate::render::Templates;
use crate::state::StateDir;

/// Where in the state directory the cluster's identity and recorded values live.
pub const CA_CERT_FILE: &str = "cluster/ca.crt";
pub const CA_KEY_FILE: &str = "cluster/ca.key";
pub const TOKEN_FILE: &str = "cluster/bootstrap-token";
pub const CERT_KEY_FILE: &str = "cluster/certificate-key";
pub const VRRP_FILE: &str = "cluster/vrrp-password";
pub const VALUES_FILE: &str = "cluster/values.json";
/// The admin kubeconfig handed to the user (0600).
pub const KUBECONFIG_FILE: &str = "kubeconfig";

const DONE: &str = "done";

pub struct ProvisionInput<'a> {
    pub plan: &'a LabPlan,
    pub templates: &'a Templates,
    pub timeouts: &'a Timeouts,
    pub journal: Arc<JournalHandle>,
    pub user_private_key: &'a str,
    /// Public host key (OpenSSH line) per node: the pin.
    pub host_keys: &'a BTreeMap<String, String>,
    /// `--from PHASE`: this phase and every later one run again (their probes still decide what is
    /// already in place); earlier ones follow the journal.
    pub from: Option<PhaseId>,
    /// `--node NODE…`: only these nodes' parts of the phases (cluster-wide phases still run on the
    /// first control plane).
    pub only: Option<BTreeSet<String>>,
    /// Download a Calico release klab has no pinned digest for.
    pub allow_unpinned_calico: bool,
    /// Whether the host routes to an address through a bridge (local hypervisors only).
    pub route_check: Option<RouteCheck>,
    pub jobs: usize,
}

/// What one phase did.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummary {
    pub phase: &'static str,
    /// Nodes that ran it now.
    pub ran: Vec<String>,
    /// Nodes whose probe said it was already in place.
    pub already: Vec<String>,
    /// Nodes the journal already had it finished for (not contacted for it).
    pub journal: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProvisionOutcome {
    /// False when every phase was finished already.
    pub changed: bool,
    pub kubernetes_version: Option<String>,
    pub endpoint: String,
    /// The kubeconfig in the state directory (0600), when the cluster has handed one over.
    pub kubeconfig: Option<PathBuf>,
    /// `None` when the host reaches the API endpoint; else why not and what to do.
    pub unreachable: Option<String>,
    pub phases: Vec<PhaseSummary>,
    pub seconds: f64,
    /// What klab itself added to the phases' time (absent when nothing ran).
    pub overhead: Option<Overhead>,
    /// What the `verify` phase established on this run (absent when it did not run). Boxed: the
    /// outcome travels inside `klab up`'s.
    pub verification: Option<Box<Verification>>,
}

/// The `verify` phase's checks, by label: those that passed and those that could not decide.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub verified: Vec<String>,
    pub not_verified: Vec<Unverified>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unverified {
    pub check: String,
    /// What the check said (its stderr), else its hint.
    pub why: String,
}

/// Every command of the verify phase that ran is verified unless it only warned.
fn verification(phase: &Phase, warnings: &[crate::provision::runner::Warned]) -> Verification {
    let mut v = Verification::default();
    for np in &phase.nodes {
        for op in &np.ops {
            let crate::plan::provision::Op::Run(c) = op else {
                continue;
            };
            match warnings
                .iter()
                .find(|w| w.node == np.node && w.command == c.name)
            {
                Some(w) => v.not_verified.push(Unverified {
                    check: c.name.clone(),
                    why: if w.stderr.trim().is_empty() {
                        c.hint.clone().unwrap_or_else(|| "it only warned".into())
                    } else {
                        w.stderr.trim().to_string()
                    },
                }),
                None => v.verified.push(c.name.clone()),
            }
        }
    }
    v
}

/// klab's own share of the provisioning time: per phase, the phase's wall time minus the longest
/// time a node spent running the phase's commands (each command's host-side time less one SSH
/// round trip, measured on the node's session with `true`). What remains is SSH round trips,
/// uploads, probes' bookkeeping, journal writes and waiting between commands.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub seconds: f64,
    /// `seconds` / the phases' wall time.
    pub share: f64,
    pub phases_seconds: f64,
    pub commands: u32,
    /// Median-free, simple: the smallest of three `true` round trips, per node, in milliseconds.
    pub round_trip_ms: BTreeMap<String, f64>,
}

/// The cluster's identity, made once per lab.
struct Identity {
    ca: identity::ClusterCa,
    token: Secret,
    cert_key: Secret,
    vrrp: Secret,
}

fn state_err(e: crate::state::StateError) -> Error {
    Error::Internal(chain(&e))
}

/// Loads the identity from the state directory, making what is missing. The CA and the keys are
/// written 0600 before any node sees them, so a crash never leaves a cluster with a CA klab lost.
fn ensure_identity(state: &StateDir) -> Result<Identity, Error> {
    let cert = state.read_file(CA_CERT_FILE).map_err(state_err)?;
    let key = state.read_file(CA_KEY_FILE).map_err(state_err)?;
    let ca = match (cert, key) {
        (Some(cert_pem), Some(key_pem)) => {
            let cert_hash = identity::ca_cert_hash(&cert_pem).map_err(|e| {
                Error::user(
                    format!(
                        "{}: {}",
                        state.path().join(CA_CERT_FILE).display(),
                        chain(&e)
                    ),
                    "the lab's cluster CA is damaged; `klab down` and `klab up` rebuild the lab",
                )
            })?;
            identity::ClusterCa {
                cert_pem,
                key_pem: Secret::new(key_pem),
                cert_hash,
            }
        }
        _ => {
            let ca =
                identity::generate_ca(SystemTime::now()).map_err(|e| Error::Internal(chain(&e)))?;
            state
                .write_private_file(CA_KEY_FILE, ca.key_pem.expose().as_bytes())
                .map_err(state_err)?;
            state
                .write_private_file(CA_CERT_FILE, ca.cert_pem.as_bytes())
                .map_err(state_err)?;
            ca
        }
    };
    let secret = |file: &str, make: fn() -> Secret| -> Result<Secret, Error> {
        match state.read_file(file).map_err(state_err)? {
            Some(s) if !s.trim().is_empty() => Ok(Secret::new(s.trim().to_string())),
            _ => {
                let s = make();
                state
                    .write_private_file(file, format!("{}\n", s.expose()).as_bytes())
                    .map_err(state_err)?;
                Ok(s)
            }
        }
    };
    Ok(Identity {
        ca,
        token: secret(TOKEN_FILE, identity::bootstrap_token)?,
        cert_key: secret(CERT_KEY_FILE, identity::certificate_key)?,
        vrrp: secret(VRRP_FILE, identity::vrrp_password)?,
    })
}

/// Public values captured on earlier runs (the resolved patch, each node's OS), by name.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Recorded {
    #[serde(default)]
    cluster: BTreeMap<String, String>,
    #[serde(default)]
    nodes: BTreeMap<String, BTreeMap<String, String>>,
}

fn load_recorded(state: &StateDir) -> Recorded {
    state
        .read_file(VALUES_FILE)
        .ok()
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Values that must stay the same on every run: the resolved patch (nodes added later install it).
const KEPT_CLUSTER_VALUES: &[&str] = &[value::KUBERNETES_VERSION];

fn save_recorded(state: &StateDir, values: &Values) -> Result<(), Error> {
    let mut r = Recorded::default();
    for (k, v) in &values.cluster {
        if let Val::Public(s) = v
            && KEPT_CLUSTER_VALUES.contains(&k.as_str())
        {
            r.cluster.insert(k.clone(), s.clone());
        }
    }
    for (node, m) in &values.nodes {
        for (k, v) in m {
            if let Val::Public(s) = v {
                r.nodes
                    .entry(node.clone())
                    .or_default()
                    .insert(k.clone(), s.clone());
            }
        }
    }
    let text = serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.to_string()))?;
    state
        .write_private_file(VALUES_FILE, text.as_bytes())
        .map_err(state_err)?;
    Ok(())
}

/// sha256 of what a node's part of a phase applies (resolved templates, markers unfilled): the
/// journal's record of it. Secrets never enter it (they are markers here).
pub fn phase_hash(np: &NodePhase) -> String {
    let bytes = serde_json::to_vec(np).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Phases that only read, or that check the whole cluster: they run whenever anything else ran.
fn is_cluster_check(id: PhaseId) -> bool {
    matches!(
        id,
        PhaseId::JoinCredentials | PhaseId::WaitReady | PhaseId::Kubeconfig | PhaseId::Verify
    )
}

/// Which nodes of `phase` must run now: the journal has no finished record with this hash, the
/// phase is at or after `--from`, or it always runs. `--node` narrows it.
fn pending(
    phase: &Phase,
    journal: &crate::reconcile::journal::Journal,
    from: Option<PhaseId>,
    only: Option<&BTreeSet<String>>,
    anything_ran: bool,
) -> (Vec<NodePhase>, Vec<String>) {
    let mut run = Vec::new();
    let mut done = Vec::new();
    let forced = from.is_some_and(|f| phase.id >= f);
    for np in &phase.nodes {
        let in_scope = match only {
            Some(set) => set.contains(&np.node) || is_cluster_check(phase.id),
            None => true,
        };
        let finished = journal
            .nodes
            .get(&np.node)
            .and_then(|r| r.phases.get(phase.id.as_str()))
            .is_some_and(|p| p.status == DONE && p.input_hash.as_deref() == Some(&phase_hash(np)));
        let always = phase.id == PhaseId::DetectOs || (is_cluster_check(phase.id) && anything_ran);
        if in_scope && (always || forced || !finished) {
            run.push(np.clone());
        } else {
            done.push(np.node.clone());
        }
    }
    (run, done)
}

/// A node's log file (0600), appended to across runs.
struct NodeLog {
    file: Mutex<Option<std::fs::File>>,
}

impl NodeLog {
    fn open(path: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|f| {
                // An older file keeps its mode otherwise.
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                Ok(f)
            })
            .map_err(|e| tracing::warn!("cannot write the node log {}: {e}", path.display()))
            .ok();
        Self {
            file: Mutex::new(file),
        }
    }

    fn line(&self, text: &str) {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = guard.as_mut() {
            let now = time::OffsetDateTime::now_utc();
            let stamp = now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| now.unix_timestamp().to_string());
            let _ = writeln!(f, "[{stamp}] {text}");
        }
    }
}

/// Replaces every known secret, and any line that carries key material, before text is logged.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Arc<Mutex<Vec<String>>>,
}

impl Redactor {
    fn add(&self, secret: &str) {
        let s = secret.trim();
        if !s.is_empty() {
            let mut v = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
            if !v.iter().any(|x| x == s) {
                v.push(s.to_string());
            }
        }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in self
            .secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            out = out.replace(s.as_str(), REDACTED);
        }
        out.lines()
            .map(|l| {
                if l.contains("-data:") || l.contains("PRIVATE KEY") || l.contains("--token") {
                    match l.find(':') {
                        Some(i) if l.contains("-data:") => format!("{} {REDACTED}", &l[..=i]),
                        _ => REDACTED.to_string(),
                    }
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One node's SSH session as the runner sees it: every command logged (redacted) to the node's log.
struct NodeRemote {
    node: String,
    session: Box<dyn NodeSession>,
    log: Arc<NodeLog>,
    redactor: Redactor,
    /// Commands run and the seconds they took as seen from the host (for the overhead figure).
    stats: Mutex<(u32, f64)>,
}

impl NodeRemote {
    fn stats(&self) -> (u32, f64) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Remote for NodeRemote {
    fn node(&self) -> &str {
        &self.node
    }

    async fn exec(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<CommandOutput, RemoteError> {
        // Redacted: the filled-in command may hold the bootstrap token or the certificate key.
        let shown = self.redactor.redact(command);
        tracing::debug!(node = %self.node, "$ {shown}");
        let started = Instant::now();
        let r = self.session.exec_input(command, stdin, timeout).await;
        let secs = started.elapsed().as_secs_f64();
        {
            let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.0 += 1;
            st.1 += secs;
        }
        match &r {
            Ok(out) => {
                let mut entry = format!("$ {shown}\n  exit {} after {secs:.1}s", out.exit_status);
                if !out.stderr.trim().is_empty() {
                    entry.push_str(&format!(
                        "\n  stderr:\n{}",
                        self.redactor.redact(&tail_lines(&out.stderr, 40))
                    ));
                }
                // Stdout may carry captured secrets (admin.conf); only a failure's tail is kept.
                if !out.success() && !out.stdout.trim().is_empty() {
                    entry.push_str(&format!(
                        "\n  stdout:\n{}",
                        self.redactor.redact(&tail_lines(&out.stdout, 40))
                    ));
                }
                self.log.line(&entry);
            }
            Err(e) => self.log.line(&format!(
                "$ {shown}\n  error after {secs:.1}s: {}",
                self.redactor.redact(&e.to_string())
            )),
        }
        r
    }

    async fn upload(&self, path: &str, data: &[u8], mode: u32) -> Result<(), RemoteError> {
        let cmd = crate::provision::runner::as_root(&write_file_script(path, mode, "root:root"));
        let out = self.exec(&cmd, Some(data), Duration::from_secs(60)).await?;
        if out.success() {
            Ok(())
        } else {
            Err(RemoteError::Failed {
                node: self.node.clone(),
                command: format!("write {path}"),
                status: out.exit_status,
                stderr: stderr_tail(&out.stderr),
            })
        }
    }
}

/// Runs the lab's Kubernetes phases. `Ok(None)` for a lab without `[kubernetes]`.
pub async fn provision(
    env: &Env,
    state: &StateDir,
    input: ProvisionInput<'_>,
) -> Result<Option<ProvisionOutcome>, Error> {
    let plan = input.plan;
    let Some(k) = &plan.kubernetes else {
        return Ok(None);
    };
    let started = Instant::now();
    let p = &env.printer;
    let resolved: ProvisionPlan = crate::render::resolve_provision(plan, input.templates)
        .map_err(|e| Error::user(chain(&e), "check your template overrides (--templates)"))?
        .unwrap_or_default();
    if let Some(only) = &input.only
        && let Some(bad) = only
            .iter()
            .find(|n| !k.control_planes.contains(n) && !k.workers.contains(n))
    {
        return Err(Error::user(
            format!("`{bad}` is not a Kubernetes node of lab {}", plan.lab),
            format!(
                "Kubernetes nodes: {}",
                k.control_planes
                    .iter()
                    .chain(&k.workers)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }

    // What the journal says is still to do, before anything is fetched or dialled.
    let journal = input.journal.snapshot();
    let work: Vec<(&Phase, Vec<NodePhase>, Vec<String>)> = {
        let mut out = Vec::new();
        let mut anything = false;
        for phase in &resolved.phases {
            let (run, done) = pending(phase, &journal, input.from, input.only.as_ref(), anything);
            if phase.id != PhaseId::DetectOs && !run.is_empty() {
                anything = true;
            }
            out.push((phase, run, done));
        }
        if !anything {
            // Nothing to do: the cluster-wide checks and detect-os stay quiet too.
            for (_, run, done) in out.iter_mut() {
                done.extend(run.drain(..).map(|np| np.node));
            }
        }
        out
    };
    let changed = work.iter().any(|(_, run, _)| !run.is_empty());
    let endpoint = k.control_plane_endpoint.clone();
    let kubeconfig_path = state.path().join(KUBECONFIG_FILE);
    let unreachable = reachability(plan, input.route_check.as_ref(), &state.ssh_config_path());
    if !changed {
        if input.from.is_none() && input.only.is_none() {
            check_members(env, plan, &input, &journal).await?;
        }
        return Ok(Some(ProvisionOutcome {
            changed: false,
            kubernetes_version: k.patch_version.clone().or_else(|| {
                load_recorded(state)
                    .cluster
                    .remove(value::KUBERNETES_VERSION)
            }),
            endpoint,
            kubeconfig: kubeconfig_path.exists().then_some(kubeconfig_path),
            unreachable,
            phases: work
                .iter()
                .map(|(ph, _, done)| PhaseSummary {
                    phase: ph.id.as_str(),
                    ran: Vec::new(),
                    already: Vec::new(),
                    journal: done.clone(),
                    seconds: 0.0,
                })
                .collect(),
            seconds: started.elapsed().as_secs_f64(),
            overhead: None,
            verification: None,
        }));
    }

    let ident = ensure_identity(state)?;
    let redactor = Redactor::default();
    redactor.add(ident.token.expose());
    redactor.add(ident.cert_key.expose());
    redactor.add(ident.ca.key_pem.expose());
    redactor.add(ident.vrrp.expose());

    let mut values = Values::default();
    values.set_public(value::CA_CERT, ident.ca.cert_pem.clone());
    values.set_secret(value::CA_KEY, ident.ca.key_pem.clone());
    values.set_public(value::CA_CERT_HASH, ident.ca.cert_hash.clone());
    values.set_secret(value::BOOTSTRAP_TOKEN, ident.token.clone());
    values.set_secret(value::CERTIFICATE_KEY, ident.cert_key.clone());
    values.set_secret(value::VRRP_PASSWORD, ident.vrrp.clone());
    let recorded = load_recorded(state);
    for (name, v) in &recorded.cluster {
        values.set_public(name, v.clone());
    }
    for (node, m) in &recorded.nodes {
        let entry = values.nodes.entry(node.clone()).or_default();
        for (name, v) in m {
            entry.insert(name.clone(), Val::Public(v.clone()));
        }
    }
    if let Some(v) = &k.patch_version {
        values.set_public(value::KUBERNETES_VERSION, v.clone());
    }
    let calico_due = work
        .iter()
        .any(|(ph, run, _)| ph.id == PhaseId::Calico && !run.is_empty());
    if calico_due {
        values.set_public(
            value::CALICO_MANIFEST,
            calico_manifest(env, k, input.allow_unpinned_calico).await?,
        );
    }

    // One session per node that has work, dialled together.
    let needed: BTreeSet<String> = work
        .iter()
        .flat_map(|(_, run, _)| run.iter().map(|np| np.node.clone()))
        .collect();
    let logs_dir = state.path().join("logs");
    std::fs::create_dir_all(&logs_dir)
        .and_then(|_| std::fs::set_permissions(&logs_dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", logs_dir.display())))?;
    let width = needed.iter().map(String::len).max().unwrap_or(4);
    let mut logs: BTreeMap<String, Arc<NodeLog>> = BTreeMap::new();
    let mut bars: BTreeMap<String, NodeProgress> = BTreeMap::new();
    for n in &needed {
        let log = Arc::new(NodeLog::open(logs_dir.join(format!("{n}.log"))));
        log.line(&format!("== klab {} provision", env!("CARGO_PKG_VERSION")));
        logs.insert(n.clone(), log);
        let bar = p.node(n, width);
        bar.step("connecting");
        bars.insert(n.clone(), bar);
    }
    let remotes = dial_all(env, plan, &input, &needed, &logs, &redactor).await?;
    let mut rtt: BTreeMap<String, f64> = BTreeMap::new();
    for (n, r) in &remotes {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            if r.session
                .exec("true", Duration::from_secs(30))
                .await
                .is_ok()
            {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        rtt.insert(n.clone(), if best == f64::MAX { 0.0 } else { best });
    }
    let (mut overhead_secs, mut phases_secs, mut commands) = (0.0f64, 0.0f64, 0u32);

    let on_event = |e: &Event| {
        let (node, text, plain) = match e {
            Event::PhaseStarted { .. } => return,
            Event::NodeStarted { phase, node } => (node, phase.as_str().to_string(), true),
            Event::NodeSkipped { phase, node } => {
                (node, format!("{}: already in place", phase.as_str()), true)
            }
            Event::Step { phase, node, what } => {
                (node, format!("{}: {what}", phase.as_str()), false)
            }
            Event::Warning {
                phase,
                node,
                message,
            } => (
                node,
                format!("{}: warning: {message}", phase.as_str()),
                false,
            ),
            Event::NodeDone {
                phase,
                node,
                elapsed,
            } => (
                node,
                format!("{} done in {:.1}s", phase.as_str(), elapsed.as_secs_f64()),
                false,
            ),
        };
        if let Some(log) = logs.get(node) {
            log.line(&text);
        }
        if let Some(bar) = bars.get(node) {
            if plain {
                bar.step(&text);
            } else {
                bar.detail(&text);
            }
        }
        if let Event::Warning { node, message, .. } = e {
            p.note(format!("warning: {node}: {message}"));
        }
    };
    let runner = Runner::new(&remotes, input.jobs.max(1), &on_event);

    let mut summaries = Vec::new();
    let mut failure = None;
    let mut verified = None;
    for (phase, run, journal_done) in &work {
        if run.is_empty() {
            summaries.push(PhaseSummary {
                phase: phase.id.as_str(),
                ran: Vec::new(),
                already: Vec::new(),
                journal: journal_done.clone(),
                seconds: 0.0,
            });
            continue;
        }
        let subset = Phase {
            nodes: run.clone(),
            ..(*phase).clone()
        };
        tracing::info!(phase = phase.id.as_str(), nodes = run.len(), "phase");
        let before: BTreeMap<&String, (u32, f64)> =
            remotes.iter().map(|(n, r)| (n, r.stats())).collect();
        match runner.run_phase(&subset, &mut values).await {
            Ok(report) => {
                let mut busiest = 0.0f64;
                for (n, r) in &remotes {
                    let (c0, s0) = before[n];
                    let (c1, s1) = r.stats();
                    let count = c1 - c0;
                    commands += count;
                    let on_node = (s1 - s0) - f64::from(count) * rtt[n];
                    busiest = busiest.max(on_node);
                }
                let wall = report.elapsed.as_secs_f64();
                phases_secs += wall;
                overhead_secs += (wall - busiest).max(0.0);
                input
                    .journal
                    .update(|j| {
                        for np in run {
                            if let Some(rec) = j.nodes.get_mut(&np.node) {
                                rec.phases.insert(
                                    phase.id.as_str().to_string(),
                                    PhaseRecord {
                                        status: DONE.to_string(),
                                        input_hash: Some(phase_hash(np)),
                                    },
                                );
                            }
                        }
                    })
                    .map_err(|e| Error::Internal(chain(&e)))?;
                if let Some(Val::Secret(s)) = values.cluster.get(value::ADMIN_KUBECONFIG) {
                    redactor.add(s.expose());
                }
                save_recorded(state, &values)?;
                if phase.id == PhaseId::Verify {
                    verified = Some(Box::new(verification(&subset, &report.warnings)));
                }
                let (mut ran, mut already) = (Vec::new(), Vec::new());
                for (n, o) in report.nodes {
                    match o {
                        NodeOutcome::Done => ran.push(n),
                        NodeOutcome::AlreadyDone => already.push(n),
                    }
                }
                summaries.push(PhaseSummary {
                    phase: phase.id.as_str(),
                    ran,
                    already,
                    journal: journal_done.clone(),
                    seconds: report.elapsed.as_secs_f64(),
                });
                crash_point(&format!("provision-after-{}", phase.id.as_str()));
            }
            Err(e) => {
                if let Some(node) = failed_node(&e)
                    && let Some(log) = logs.get(&node)
                {
                    log.line(&format!("FAILED: {}", redactor.redact(&e.to_string())));
                }
                failure = Some(e);
                break;
            }
        }
    }
    for (n, bar) in &bars {
        match &failure {
            Some(e) if failed_node(e).as_deref() == Some(n) => bar.fail(phase_of(e)),
            Some(_) => bar.done("stopped (another node failed)"),
            None => bar.done("provisioned"),
        }
    }
    for (_, r) in remotes {
        r.session.close().await;
    }
    if let Some(e) = failure {
        let log = failed_node(&e)
            .map(|n| logs_dir.join(format!("{n}.log")).display().to_string())
            .unwrap_or_default();
        let next = missing_value_hint(&e, &plan.lab, state, &resolved).unwrap_or_else(|| {
            format!(
                "after fixing the cause run `klab up` again: finished phases are skipped (`klab provision {} --from PHASE` reruns from a phase)",
                plan.lab
            )
        });
        return Err(Error::user(
            format!(
                "lab {}: Kubernetes is not ready:\n{}",
                plan.lab,
                redactor.redact(&e.to_string())
            ),
            format!("the node's log is {log}; {next}"),
        ));
    }

    let kubeconfig = match values.cluster.get(value::ADMIN_KUBECONFIG) {
        Some(Val::Secret(admin)) => {
            let server = format!("https://{endpoint}");
            let text = crate::kubeconfig::for_lab(admin.expose(), &plan.lab, Some(&server))
                .map_err(|e| {
                    Error::Internal(format!(
                        "the admin kubeconfig of {} cannot be read: {e}",
                        k.init_node
                    ))
                })?;
            Some(
                state
                    .write_private_file(KUBECONFIG_FILE, text.expose().as_bytes())
                    .map_err(state_err)?,
            )
        }
        _ => kubeconfig_path.exists().then_some(kubeconfig_path),
    };
    let version = match values.cluster.get(value::KUBERNETES_VERSION) {
        Some(Val::Public(v)) => Some(v.clone()),
        _ => k.patch_version.clone(),
    };
    Ok(Some(ProvisionOutcome {
        changed: true,
        kubernetes_version: version,
        endpoint,
        kubeconfig,
        unreachable,
        phases: summaries,
        seconds: started.elapsed().as_secs_f64(),
        overhead: Some(Overhead {
            seconds: overhead_secs,
            share: if phases_secs > 0.0 {
                overhead_secs / phases_secs
            } else {
                0.0
            },
            phases_seconds: phases_secs,
            commands,
            round_trip_ms: rtt.into_iter().map(|(n, s)| (n, s * 1000.0)).collect(),
        }),
        verification: verified,
    }))
}

/// `klab provision`: the phases again on a lab that is up, from its saved plan.
pub struct ProvisionRequest {
    pub lab: String,
    pub templates: Templates,
    pub from: Option<String>,
    pub only: Vec<String>,
    pub allow_unpinned: bool,
    pub jobs: usize,
    pub host: super::host::HostFs,
}

pub async fn provision_lab(env: &Env, req: ProvisionRequest) -> Result<ProvisionOutcome, Error> {
    let state = env.paths.state(&req.lab);
    if !state.exists() {
        return Err(Error::user(
            format!("lab {} is not on this host", req.lab),
            "`klab up LAB_FILE` builds it; `klab list` shows the labs here",
        ));
    }
    let _lock = state.lock()?;
    let plan = state.load_plan().map_err(state_err)?.ok_or_else(|| {
        Error::user(
            format!("lab {} has no saved plan", req.lab),
            "run `klab up LAB_FILE` first",
        )
    })?;
    let Some(k) = &plan.kubernetes else {
        return Err(Error::user(
            format!(
                "lab {} has no [kubernetes] section: there is nothing to provision",
                req.lab
            ),
            "add [kubernetes] to the lab file and run `klab up` again",
        ));
    };
    let from = match &req.from {
        None => None,
        Some(name) => {
            let in_lab: Vec<&str> = k.provision.phases.iter().map(|p| p.id.as_str()).collect();
            match PhaseId::parse(name).filter(|p| in_lab.contains(&p.as_str())) {
                Some(p) => Some(p),
                None => {
                    let near = in_lab
                        .iter()
                        .copied()
                        .min_by_key(|p| crate::config::units::edit_distance(name, p))
                        .filter(|p| crate::config::units::edit_distance(name, p) <= 3);
                    let hint = match near {
                        Some(s) => format!(
                            "did you mean `{s}`? this lab's phases: {}",
                            in_lab.join(", ")
                        ),
                        None => format!("this lab's phases: {}", in_lab.join(", ")),
                    };
                    return Err(Error::user(
                        format!(
                            "--from: `{}` is not a phase of lab {}",
                            crate::config::escape(name),
                            req.lab
                        ),
                        hint,
                    ));
                }
            }
        }
    };
    let meta = state.load_meta().map_err(state_err)?;
    let timeouts = super::lab_timeouts(meta.as_ref());
    let names: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    let keys = state
        .ensure_keys(&names, crate::keys::generate_ed25519)
        .map_err(state_err)?;
    let host_keys: BTreeMap<String, String> = keys
        .host_keys
        .iter()
        .map(|(n, k)| (n.clone(), k.public_openssh.clone()))
        .collect();
    let journal = state
        .load_journal()
        .unwrap_or_else(|e| {
            tracing::warn!("{}; every phase runs again", chain(&e));
            None
        })
        .filter(|j| j.lab == req.lab)
        .unwrap_or_else(|| crate::reconcile::journal::Journal::new(&req.lab));
    let journal = Arc::new(JournalHandle::new(Some(state.clone()), journal));
    let uri = meta.as_ref().map(|m| m.uri.as_str()).unwrap_or_default();
    let route_check = super::route_check(env, uri, &req.host);
    let only: Option<BTreeSet<String>> =
        (!req.only.is_empty()).then(|| req.only.iter().cloned().collect());
    let user_private_key = state.user_private_key().map_err(state_err)?;
    let outcome = provision(
        env,
        &state,
        ProvisionInput {
            plan: &plan,
            templates: &req.templates,
            timeouts: &timeouts,
            journal,
            user_private_key: &user_private_key,
            host_keys: &host_keys,
            from,
            only,
            allow_unpinned_calico: req.allow_unpinned,
            route_check,
            jobs: req.jobs,
        },
    )
    .await?;
    outcome.ok_or_else(|| Error::Internal("a Kubernetes lab produced no provisioning".into()))
}

/// Nodes leaving a built cluster (gone from the lab file, or rebuilt by `--recreate`), before their
/// VMs go, in [`crate::plan::provision::LeaveOps`]'s order: drained from the first control plane
/// while the node still runs, `kubeadm reset` on the node, a control plane's etcd member removed
/// when it is still there, the Node deleted. A node that does not answer is neither drained nor
/// reset; the notes say so (and what the reset did not do).
#[allow(clippy::too_many_arguments)]
pub async fn leave_cluster(
    env: &Env,
    previous: &LabPlan,
    current: &LabPlan,
    leaving: &[String],
    user_private_key: &str,
    host_keys: &BTreeMap<String, String>,
    timeouts: &Timeouts,
) -> Result<Vec<String>, Error> {
    let Some(k) = &current.kubernetes else {
        return Ok(Vec::new());
    };
    if leaving.contains(&k.init_node) {
        return Err(Error::user(
            format!(
                "node {} runs the cluster's first control plane and cannot leave it",
                k.init_node
            ),
            "rebuild the whole lab (`klab down` then `klab up`), or keep the node",
        ));
    }
    let target = |plan: &LabPlan, name: &str| -> Option<SshTarget> {
        let node = plan.node(name)?;
        Some(SshTarget {
            node: name.to_string(),
            addr: SocketAddr::from((node.ssh_address, 22)),
            user: node.user.clone(),
            user_private_key: user_private_key.to_string(),
            host_public_key: host_keys.get(name)?.clone(),
        })
    };
    let init_target = target(current, &k.init_node)
        .ok_or_else(|| Error::Internal(format!("no SSH target for {}", k.init_node)))?;
    let init = env
        .dialer
        .dial(&init_target, timeouts.ssh)
        .await
        .map_err(|e| {
            Error::user(
                format!(
                    "nodes {} must leave the cluster first, but {} does not answer: {e}",
                    leaving.join(", "),
                    k.init_node
                ),
                "start the lab's first control plane (`klab up` after fixing it), or pass --no-kubernetes to change only the VMs",
            )
        })?;
    let mut notes = Vec::new();
    let result = leave_each(
        env, previous, k, leaving, &target, &*init, timeouts, &mut notes,
    )
    .await;
    init.close().await;
    result.map(|()| notes)
}

/// [`leave_cluster`]'s work per node, over the first control plane's session `init`.
#[allow(clippy::too_many_arguments)]
async fn leave_each(
    env: &Env,
    previous: &LabPlan,
    k: &crate::plan::KubernetesSpec,
    leaving: &[String],
    target: &dyn Fn(&LabPlan, &str) -> Option<SshTarget>,
    init: &dyn NodeSession,
    timeouts: &Timeouts,
    notes: &mut Vec<String>,
) -> Result<(), Error> {
    let on_init = |op: crate::plan::provision::CommandOp| async move {
        let out = init
            .exec(
                &crate::provision::runner::as_root(&op.run),
                Duration::from_secs(op.timeout_secs),
            )
            .await
            .map_err(|e| {
                Error::user(
                    format!("{}: {}: {e}", k.init_node, op.name),
                    "check the first control plane, then `klab up` again",
                )
            })?;
        if out.success() {
            return Ok(out.stdout);
        }
        Err(Error::user(
            format!(
                "{}: `{}` failed with exit status {}: {}",
                k.init_node,
                op.name,
                out.exit_status,
                stderr_tail(&out.stderr)
            ),
            op.hint
                .clone()
                .unwrap_or_else(|| "check the cluster, then `klab up` again".into()),
        ))
    };
    let was_control_plane = |name: &str| {
        previous
            .kubernetes
            .as_ref()
            .unwrap_or(k)
            .control_planes
            .iter()
            .any(|n| n == name)
    };
    for name in leaving {
        let control_plane = was_control_plane(name);
        let ops =
            crate::plan::provision::leave_ops(name, control_plane, &k.init_node, timeouts.command);
        env.printer.note(format!("{name}: leaving the cluster"));
        // A short wait: a node that does not answer is already gone.
        let session = match target(previous, name) {
            Some(t) => match env.dialer.dial(&t, Duration::from_secs(30)).await {
                Ok(s) => Ok(s),
                Err(e) => Err(format!("{name} does not answer ({e})")),
            },
            None => Err(format!("{name} is not in the saved plan")),
        };
        match session {
            Ok(session) => {
                // Drained while its kubelet still runs, so its pods really end.
                if let Err(e) = on_init(ops.drain.clone()).await {
                    session.close().await;
                    return Err(e);
                }
                let r = session
                    .exec(
                        &crate::provision::runner::as_root(&ops.reset.run),
                        Duration::from_secs(ops.reset.timeout_secs),
                    )
                    .await;
                session.close().await;
                let failed = match r {
                    Ok(out) if out.success() => None,
                    Ok(out) => Some(format!(
                        "exit status {}: {}",
                        out.exit_status,
                        stderr_tail(&out.stderr)
                    )),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = failed {
                    notes.push(format!(
                        "{name}: drained, but `kubeadm reset` failed ({why}); {}",
                        ops.reset.hint.as_deref().unwrap_or_default()
                    ));
                }
            }
            Err(why) => {
                notes.push(format!(
                    "{why}: not drained and not reset; {}",
                    if control_plane {
                        "its etcd member is removed on the first control plane and its Node deleted"
                    } else {
                        "its Node is deleted (the pods still bound to it go with it)"
                    }
                ));
            }
        }
        // The reset of a control plane takes its etcd member along; this removes it when the
        // reset did not (or could not) run, and finds nothing otherwise.
        if let Some(rm) = ops.remove_member.clone() {
            let out = on_init(rm).await?;
            if let Some(line) = out.lines().find(|l| l.contains("removed from cluster")) {
                notes.push(format!("{name}: etcd: {}", line.trim()));
            }
        }
        on_init(ops.delete.clone()).await?;
    }
    Ok(())
}

/// A value a phase needs that nothing provided: which, why, and how to get it. The cluster-wide
/// values are recorded in `cluster/values.json` the run that captures them; a node added later
/// relies on that record.
fn missing_value_hint(
    e: &crate::provision::runner::RunError,
    lab: &str,
    state: &StateDir,
    plan: &ProvisionPlan,
) -> Option<String> {
    let crate::provision::runner::RunError::MissingValue { name, .. } = e else {
        return None;
    };
    let record = state.path().join(VALUES_FILE);
    if name == value::KUBERNETES_VERSION {
        return Some(format!(
            "the Kubernetes patch this cluster runs is not recorded in {} (removed, damaged, or from an older klab): \
             run `klab provision {lab} --from {}` (on a built cluster it reads the patch the first control plane runs), \
             or pin that patch in the lab file (`version = \"1.36.4\"`, the VERSION column of `kubectl get nodes`)",
            record.display(),
            PhaseId::ResolveVersion.as_str()
        ));
    }
    let by = plan.phases.iter().find(|ph| {
        ph.nodes.iter().any(|np| {
            np.ops.iter().any(|op| match op {
                crate::plan::provision::Op::Run(c) => {
                    c.captures.iter().any(|cap| &cap.value == name)
                }
                crate::plan::provision::Op::File(_) => false,
            })
        })
    });
    Some(match by {
        Some(ph) => format!(
            "`{name}` is captured by the phase `{}` and kept in {}; run `klab provision {lab} --from {}` to capture it again",
            ph.id.as_str(),
            record.display(),
            ph.id.as_str()
        ),
        None => format!(
            "`{name}` is one of the values klab keeps in {}: the state directory is damaged; `klab down` and `klab up` rebuild the lab",
            state.path().join("cluster").display()
        ),
    })
}

fn failed_node(e: &crate::provision::runner::RunError) -> Option<String> {
    use crate::provision::runner::RunError as R;
    match e {
        R::Failed { node, .. }
        | R::Remote { node, .. }
        | R::MissingValue { node, .. }
        | R::CaptureMissing { node, .. }
        | R::Unresolved { node, .. }
        | R::NoRemote { node, .. } => Some(node.clone()),
        R::NotUnique { nodes, .. } => nodes.first().cloned(),
    }
}

fn phase_of(e: &crate::provision::runner::RunError) -> &'static str {
    use crate::provision::runner::RunError as R;
    match e {
        R::Failed { phase, .. }
        | R::Remote { phase, .. }
        | R::MissingValue { phase, .. }
        | R::CaptureMissing { phase, .. }
        | R::Unresolved { phase, .. }
        | R::NoRemote { phase, .. }
        | R::NotUnique { phase, .. } => phase,
    }
}

/// On a built cluster with nothing to do: every member the journal has joined is still a Node of
/// the cluster. A node that left (deleted, or reset by hand) is named with the fix, never skipped.
async fn check_members(
    env: &Env,
    plan: &LabPlan,
    input: &ProvisionInput<'_>,
    journal: &crate::reconcile::journal::Journal,
) -> Result<(), Error> {
    let Some(k) = &plan.kubernetes else {
        return Ok(());
    };
    let joined = |n: &str| {
        journal.nodes.get(n).is_some_and(|r| {
            ["kubeadm-init", "join-control-plane", "join-workers"]
                .iter()
                .any(|ph| r.phases.get(*ph).is_some_and(|p| p.status == DONE))
        })
    };
    if !joined(&k.init_node) {
        return Ok(());
    }
    let (Some(node), Some(pin)) = (plan.node(&k.init_node), input.host_keys.get(&k.init_node))
    else {
        return Ok(());
    };
    let target = SshTarget {
        node: node.name.clone(),
        addr: SocketAddr::from((node.ssh_address, 22)),
        user: node.user.clone(),
        user_private_key: input.user_private_key.to_string(),
        host_public_key: pin.clone(),
    };
    let session = env
        .dialer
        .dial(&target, input.timeouts.ssh)
        .await
        .map_err(|e| {
            Error::user(
                format!("cannot reach {} to check the cluster: {e}", node.name),
                "`klab status` shows whether it runs",
            )
        })?;
    let out = session
        .exec(
            &crate::provision::runner::as_root(crate::plan::provision::NODE_NAMES),
            Duration::from_secs(60),
        )
        .await;
    session.close().await;
    let out = out.map_err(|e| {
        Error::user(
            format!("{}: the cluster check failed: {e}", node.name),
            "`klab ssh` to it and `kubectl get nodes`",
        )
    })?;
    if !out.success() {
        return Err(Error::user(
            format!(
                "lab {}: the cluster does not answer on {}: {}",
                plan.lab,
                node.name,
                stderr_tail(&out.stderr)
            ),
            format!(
                "`journalctl -u kubelet` on {}; `klab provision {} --from wait-ready` checks it again",
                node.name, plan.lab
            ),
        ));
    }
    let present: BTreeSet<&str> = out.stdout.lines().map(str::trim).collect();
    let gone: Vec<&String> = k
        .control_planes
        .iter()
        .chain(&k.workers)
        .filter(|n| joined(n) && !present.contains(n.as_str()))
        .collect();
    if gone.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = gone.iter().map(|s| s.as_str()).collect();
    Err(Error::user(
        format!(
            "lab {}: {} joined the cluster but {} no longer in it",
            plan.lab,
            names.join(", "),
            if names.len() == 1 { "is" } else { "are" }
        ),
        format!(
            "run `kubeadm reset -f` on {} (`klab ssh NODE`), then `klab provision {} --from join-workers --node NODE` (--from join-control-plane for a control plane)",
            names.join(", "),
            plan.lab
        ),
    ))
}

/// Whether the host reaches the API endpoint: `None` when it does (or cannot be told), else what
/// to do instead.
fn reachability(
    plan: &LabPlan,
    check: Option<&RouteCheck>,
    ssh_config: &std::path::Path,
) -> Option<String> {
    let k = plan.kubernetes.as_ref()?;
    let check = check?;
    let net = plan.network(&k.cluster_network)?;
    let host = k.control_plane_endpoint.rsplit_once(':')?.0;
    let addr: Ipv4Addr = host.parse().ok()?;
    let init = plan.node(&k.init_node)?;
    match check(addr, &net.bridge) {
        Ok(()) => None,
        Err(why) => Some(format!(
            "this host cannot reach the API endpoint {}: {why}\n  reach it through a node instead: \
             `ssh -F {ssh_config} -N -L 6443:{}:6443 {}` and use the kubeconfig with \
             `--server https://127.0.0.1:6443 --tls-server-name kubernetes`",
            k.control_plane_endpoint,
            k.control_plane_endpoint,
            init.name,
            ssh_config = crate::plan::provision::sh_quote(&ssh_config.display().to_string())
        )),
    }
}

/// The Calico manifest's text: the lab's own file, or the pinned release from the cache (fetched
/// and checked on the host when missing, with a progress bar).
async fn calico_manifest(
    env: &Env,
    k: &crate::plan::KubernetesSpec,
    allow_unpinned: bool,
) -> Result<String, Error> {
    let spec = crate::provision::calico::ManifestSpec::for_lab(k, allow_unpinned);
    let cache = env.images.cache_root();
    let quiet = env.printer.is_json();
    let path = tokio::task::spawn_blocking(move || {
        let r = if quiet {
            crate::provision::calico::ensure_manifest(&spec, &cache, &crate::image::NoProgress)
        } else {
            crate::provision::calico::ensure_manifest(
                &spec,
                &cache,
                &crate::image::BarProgress::new(),
            )
        };
        r.map_err(|e| {
            let hint = e
                .hint()
                .unwrap_or("check the manifest's path or the host's network");
            Error::user(chain(&e), hint)
        })
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    std::fs::read_to_string(&path)
        .map_err(|e| Error::Internal(format!("cannot read {}: {e}", path.display())))
}

/// Dials every node in `needed` at once with its pinned host key.
async fn dial_all(
    env: &Env,
    plan: &LabPlan,
    input: &ProvisionInput<'_>,
    needed: &BTreeSet<String>,
    logs: &BTreeMap<String, Arc<NodeLog>>,
    redactor: &Redactor,
) -> Result<BTreeMap<String, NodeRemote>, Error> {
    let mut targets = Vec::new();
    for name in needed {
        let node = plan
            .node(name)
            .ok_or_else(|| Error::Internal(format!("node {name} is not in the plan")))?;
        let host = input.host_keys.get(name).ok_or_else(|| {
            Error::Internal(format!(
                "no pinned host key for {name} in the state directory"
            ))
        })?;
        targets.push(SshTarget {
            node: name.clone(),
            addr: SocketAddr::from((node.ssh_address, 22)),
            user: node.user.clone(),
            user_private_key: input.user_private_key.to_string(),
            host_public_key: host.clone(),
        });
    }
    let dialer = Arc::clone(&env.dialer);
    let timeout = input.timeouts.ssh;
    let sessions = futures::future::join_all(
        targets
            .iter()
            .map(|t| async { (t.node.clone(), dialer.dial(t, timeout).await) }),
    )
    .await;
    let mut out = BTreeMap::new();
    for (node, r) in sessions {
        let session = r.map_err(|e| {
            Error::user(
                format!("cannot reach {node} for provisioning: {e}"),
                "`klab status` shows whether the node runs; `klab up` restarts what is missing",
            )
        })?;
        out.insert(
            node.clone(),
            NodeRemote {
                log: Arc::clone(&logs[&node]),
                node,
                session,
                redactor: redactor.clone(),
                stats: Mutex::new((0, 0.0)),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::provision::{Op, Schedule};
    use crate::reconcile::journal::{Journal, Step};

    fn phase(id: PhaseId, nodes: &[&str]) -> Phase {
        Phase {
            id,
            about: String::new(),
            schedule: Schedule::Parallel,
            nodes: nodes
                .iter()
                .map(|n| NodePhase {
                    node: n.to_string(),
                    probe: None,
                    ops: vec![Op::Run(crate::plan::provision::CommandOp {
                        name: "x".into(),
                        run: format!("echo {n}"),
                        timeout_secs: 1,
                        ok_exit: vec![0],
                        warn_exit: vec![],
                        captures: vec![],
                        when: None,
                        hint: None,
                        query: false,
                    })],
                })
                .collect(),
            unique: vec![],
        }
    }

    fn journal_with(done: &[(&str, &Phase)]) -> Journal {
        let mut j = Journal::new("lab");
        for (node, ph) in done {
            j.reach(node, Step::Verified, "seed");
            let np = ph.node(node).unwrap();
            j.nodes.get_mut(*node).unwrap().phases.insert(
                ph.id.as_str().into(),
                PhaseRecord {
                    status: DONE.into(),
                    input_hash: Some(phase_hash(np)),
                },
            );
        }
        j
    }

    fn names(v: &[NodePhase]) -> Vec<&str> {
        v.iter().map(|n| n.node.as_str()).collect()
    }

    #[test]
    fn finished_phases_with_the_same_hash_are_skipped() {
        let ph = phase(PhaseId::Containerd, &["cp1", "w1"]);
        let j = journal_with(&[("cp1", &ph)]);
        let (run, done) = pending(&ph, &j, None, None, false);
        assert_eq!(names(&run), ["w1"]);
        assert_eq!(done, ["cp1"]);
    }

    #[test]
    fn a_changed_phase_runs_again() {
        let old = phase(PhaseId::Containerd, &["cp1"]);
        let j = journal_with(&[("cp1", &old)]);
        let mut new = old.clone();
        new.nodes[0].ops.clear();
        let (run, _) = pending(&new, &j, None, None, false);
        assert_eq!(names(&run), ["cp1"]);
    }

    #[test]
    fn from_forces_later_phases_and_only_narrows_to_nodes() {
        let ph = phase(PhaseId::Containerd, &["cp1", "w1"]);
        let j = journal_with(&[("cp1", &ph), ("w1", &ph)]);
        let (run, _) = pending(&ph, &j, Some(PhaseId::Preflight), None, false);
        assert_eq!(names(&run), ["cp1", "w1"]);
        let (run, _) = pending(&ph, &j, Some(PhaseId::Calico), None, false);
        assert!(run.is_empty());
        let only: BTreeSet<String> = ["w1".to_string()].into();
        let (run, done) = pending(&ph, &j, Some(PhaseId::Preflight), Some(&only), false);
        assert_eq!(names(&run), ["w1"]);
        assert_eq!(done, ["cp1"]);
    }

    #[test]
    fn cluster_checks_run_when_anything_ran() {
        let ph = phase(PhaseId::Verify, &["cp1"]);
        let j = journal_with(&[("cp1", &ph)]);
        assert!(pending(&ph, &j, None, None, false).0.is_empty());
        assert_eq!(names(&pending(&ph, &j, None, None, true).0), ["cp1"]);
        let only: BTreeSet<String> = ["w1".to_string()].into();
        assert_eq!(names(&pending(&ph, &j, None, Some(&only), true).0), ["cp1"]);
    }

    #[test]
    fn redactor_hides_secrets_and_key_material() {
        let r = Redactor::default();
        r.add("abcdef.0123456789abcdef");
        let text = "kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef \\\n\
                    client-key-data: LS0tLS1CRUdJTg==\nok line\n-----BEGIN EC PRIVATE KEY-----";
        let out = r.redact(text);
        assert!(!out.contains("0123456789abcdef"), "{out}");
        assert!(!out.contains("LS0tLS1CRUdJTg"), "{out}");
        assert!(out.contains("ok line"));
        assert!(out.contains("client-key-data: <redacted>"), "{out}");
    }

    #[test]
    fn the_unreachable_hint_names_the_real_ssh_config() {
        let lab = crate::plan::fixtures::ha_lab();
        let plan = crate::plan::plan(&lab, &crate::plan::fixtures::inputs(&lab.name));
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path(), &plan.lab);
        let no_route: RouteCheck =
            Arc::new(|_, bridge: &str| Err(format!("no route via {bridge}")));
        let why =
            reachability(&plan, Some(&no_route), &state.ssh_config_path()).expect("unreachable");
        let cfg = state.ssh_config_path().display().to_string();
        assert!(why.contains(&format!("`ssh -F {cfg} -N -L 6443:")), "{why}");
        assert!(!why.contains("<state>"), "{why}");
        let route: RouteCheck = Arc::new(|_, _: &str| Ok(()));
        assert_eq!(
            reachability(&plan, Some(&route), &state.ssh_config_path()),
            None
        );
    }

    #[test]
    fn a_missing_recorded_value_says_which_and_how_to_get_it() {
        use crate::provision::runner::RunError;
        let lab = crate::plan::fixtures::ha_lab();
        let plan = crate::plan::plan(&lab, &crate::plan::fixtures::inputs(&lab.name));
        let provision = plan.kubernetes.as_ref().unwrap().provision.clone();
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path(), "demo");
        let missing = |name: &str| RunError::MissingValue {
            node: "w3".into(),
            phase: "kubernetes-packages",
            name: name.into(),
        };
        let hint = missing_value_hint(
            &missing(value::KUBERNETES_VERSION),
            "demo",
            &state,
            &provision,
        )
        .expect("a hint");
        assert!(
            hint.contains("klab provision demo --from resolve-version"),
            "{hint}"
        );
        assert!(
            hint.contains(&state.path().join(VALUES_FILE).display().to_string()),
            "{hint}"
        );
        let hint = missing_value_hint(&missing(value::SANDBOX_IMAGE), "demo", &state, &provision)
            .expect("a hint");
        assert!(
            hint.starts_with("`sandbox-image` is captured by the phase `containerd`")
                && hint
                    .ends_with("run `klab provision demo --from containerd` to capture it again"),
            "{hint}"
        );
        let other = RunError::NoRemote {
            phase: "verify",
            node: "cp1".into(),
        };
        assert_eq!(missing_value_hint(&other, "demo", &state, &provision), None);
    }

    #[test]
    fn verification_counts_a_warned_check_as_not_verified() {
        use crate::provision::runner::Warned;
        let lab = crate::plan::fixtures::ha_lab();
        let plan = crate::plan::plan(&lab, &crate::plan::fixtures::inputs(&lab.name));
        let k = plan.kubernetes.as_ref().unwrap();
        let verify = k.provision.phase(PhaseId::Verify).unwrap();
        let all = verification(verify, &[]);
        assert_eq!(all.verified.len(), 3, "{all:?}");
        assert!(all.not_verified.is_empty());
        let pod = "a pod on another node answers through the pod network";
        let v = verification(
            verify,
            &[Warned {
                node: k.init_node.clone(),
                command: pod.into(),
                stderr: "no CoreDNS pod runs on another node than cp1".into(),
            }],
        );
        assert_eq!(
            v.verified,
            [
                "node InternalIPs on the cluster network",
                "calico-node addresses on the cluster network"
            ]
        );
        assert_eq!(
            v.not_verified,
            [Unverified {
                check: pod.into(),
                why: "no CoreDNS pod runs on another node than cp1".into()
            }]
        );
    }

    #[test]
    fn identity_is_made_once_and_kept_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path(), "lab");
        let a = ensure_identity(&state).unwrap();
        let b = ensure_identity(&state).unwrap();
        assert_eq!(a.ca.cert_pem, b.ca.cert_pem);
        assert_eq!(a.ca.cert_hash, b.ca.cert_hash);
        assert_eq!(a.token.expose(), b.token.expose());
        assert_eq!(a.cert_key.expose(), b.cert_key.expose());
        assert_eq!(a.vrrp.expose().len(), 8);
        assert_eq!(a.vrrp.expose(), b.vrrp.expose());
        for f in [
            CA_CERT_FILE,
            CA_KEY_FILE,
            TOKEN_FILE,
            CERT_KEY_FILE,
            VRRP_FILE,
        ] {
            let mode = std::fs::metadata(state.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let dir_mode = std::fs::metadata(state.path().join("cluster"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }
}
