//! Applies reconcile actions through a [`Backend`]. Side effects start here.
//!
//! Networks and the pool are created first, one at a time; then each node runs its own pipeline
//! (overlay → seed → define+start → pinned SSH → cloud-init → verify) with at most `jobs` nodes in
//! flight. Every backend call runs inside `spawn_blocking`; every wait has the lab's timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::backend::{Backend, BackendError};
use crate::model::Timeouts;
use crate::output::Printer;
use crate::plan::{LabPlan, NodeSpec};
use crate::provision::Remote;
use crate::provision::ssh::{SshTarget, wait_for_ssh};
use crate::reconcile::Action;
use crate::render::RenderedLab;

/// Run one backend call off the async runtime.
pub async fn call<T: Send + 'static>(
    backend: &Arc<dyn Backend>,
    f: impl FnOnce(&dyn Backend) -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    let b = Arc::clone(backend);
    tokio::task::spawn_blocking(move || f(b.as_ref()))
        .await
        .map_err(|e| BackendError::Other(format!("backend task failed: {e}")))?
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
}

/// Apply `up` actions. Pool/network actions first (in order), then node pipelines in parallel.
pub async fn apply_up(ctx: &UpContext, actions: &[Action]) -> Result<Vec<NodeReport>, ExecError> {
    let mut create: Vec<String> = Vec::new();
    let mut start: Vec<String> = Vec::new();
    let mut wait: Vec<String> = Vec::new();
    for a in actions {
        match a {
            Action::CreatePool { pool } => {
                let xml = ctx.rendered.pool.clone().unwrap_or_default();
                let (name, lab) = (pool.clone(), ctx.plan.lab.clone());
                ctx.printer.note(format!("creating storage pool {name}"));
                call(&ctx.backend, move |b| b.ensure_pool(&name, &xml, &lab)).await?;
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
                call(&ctx.backend, move |b| b.ensure_network(&name, &xml)).await?;
            }
            Action::RemoveDomain { domain, reason } => {
                ctx.printer
                    .note(format!("removing domain {domain} ({reason})"));
                let name = domain.clone();
                call(&ctx.backend, move |b| b.remove_domain(&name)).await?;
            }
            Action::RemoveVolume { pool: p, volume } => {
                let (p, v) = (p.clone(), volume.clone());
                call(&ctx.backend, move |b| b.remove_volume(&p, &v)).await?;
            }
            Action::RemoveNetwork { network } => {
                ctx.printer.note(format!("removing network {network}"));
                let name = network.clone();
                call(&ctx.backend, move |b| b.remove_network(&name)).await?;
            }
            Action::RemovePool { pool: p } => {
                let name = p.clone();
                call(&ctx.backend, move |b| b.remove_pool(&name)).await?;
            }
            Action::CreateNode { node } => create.push(node.clone()),
            Action::StartNode { node } => start.push(node.clone()),
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
    for node in
        ctx.plan.nodes.iter().filter(|n| {
            create.contains(&n.name) || start.contains(&n.name) || wait.contains(&n.name)
        })
    {
        let mode = if create.contains(&node.name) {
            NodeMode::Create
        } else if start.contains(&node.name) {
            NodeMode::Start
        } else {
            NodeMode::WaitOnly
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum NodeMode {
    Create,
    Start,
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

    async fn run(
        &self,
        mode: NodeMode,
        progress: &crate::output::NodeProgress,
    ) -> Result<NodeReport, NodeFailure> {
        let t0 = Instant::now();
        let mut report = NodeReport {
            node: self.node.name.clone(),
            created: mode == NodeMode::Create,
            ..Default::default()
        };
        let pool = self.plan.pool.name.clone();
        let rendered = self
            .rendered
            .nodes
            .iter()
            .find(|n| n.name == self.node.name)
            .cloned()
            .ok_or_else(|| self.fail("render", "no rendered files for this node"))?;
        match mode {
            NodeMode::Create => {
                progress.step("creating disk");
                let (p, xml) = (pool.clone(), rendered.overlay_xml.clone());
                call(&self.backend, move |b| b.create_volume(&p, &xml))
                    .await
                    .map_err(|e| self.fail("creating the overlay disk", e))?;
                progress.step("creating seed");
                let (p, name, files) = (
                    pool.clone(),
                    self.node.seed.name.clone(),
                    rendered.seed.clone(),
                );
                call(&self.backend, move |b| {
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
                progress.step("booting");
                let (name, xml) = (self.node.domain.clone(), rendered.domain_xml.clone());
                call(&self.backend, move |b| b.define_and_start(&name, &xml))
                    .await
                    .map_err(|e| self.fail("defining and starting the domain", e))?;
            }
            NodeMode::Start => {
                progress.step("booting");
                let name = self.node.domain.clone();
                call(&self.backend, move |b| b.start_domain(&name))
                    .await
                    .map_err(|e| self.fail("starting the domain", e))?;
            }
            NodeMode::WaitOnly => {}
        }
        if !self.wait {
            return Ok(report);
        }
        progress.step("ssh");
        let target = SshTarget {
            node: self.node.name.clone(),
            addr: SocketAddr::from((self.node.ssh_address, 22)),
            user: self.node.user.clone(),
            user_private_key: self.user_private_key.as_str().to_string(),
            host_public_key: self.host_key.clone(),
        };
        let session = wait_for_ssh(&target, self.timeouts.ssh, |_| {})
            .await
            .map_err(|e| self.fail("ssh", e))?;
        report.ssh_seconds = Some(t0.elapsed().as_secs_f64());
        progress.step("cloud-init");
        let out = session
            .exec(
                crate::verify::CLOUD_INIT_WAIT_COMMAND,
                None,
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
                        None,
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
        progress.step("verifying");
        let probe = session
            .exec(crate::verify::PROBE_COMMAND, None, Duration::from_secs(60))
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
        report.ready_seconds = Some(t0.elapsed().as_secs_f64());
        Ok(report)
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
                call(backend, move |b| b.remove_domain(&domain)).await?
            }
            Action::RemoveVolume { pool, volume } => {
                call(backend, move |b| b.remove_volume(&pool, &volume)).await?
            }
            Action::RemoveNetwork { network } => {
                call(backend, move |b| b.remove_network(&network)).await?
            }
            Action::RemovePool { pool } => call(backend, move |b| b.remove_pool(&pool)).await?,
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
    fn console_tail_strips_escape_sequences_and_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        std::fs::write(&p, "a\n\x1b[0;32mOK\x1b[0m started\nb\n\nc\n").unwrap();
        let t = console_tail(p.to_str().unwrap(), 3);
        assert_eq!(t, vec!["OK started", "b", "c"]);
        assert!(console_tail("/nonexistent/x.log", 3).is_empty());
    }
}
