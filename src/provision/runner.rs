//! The phase runner: executes a resolved [`ProvisionPlan`] over [`Remote`]s.
//!
//! Per node and phase: the probe (skip when the work is already in place), then the ops in order —
//! files written as root with their mode and owner in one round trip (content on stdin), commands
//! run as root with their timeout and accepted exit codes, values captured from stdout. Nodes of a
//! phase run in parallel (bounded) or strictly one at a time; phases run in order. `${klab:NAME}`
//! markers are filled in from the [`Values`] just before text goes to a node; secrets never reach
//! an error, an event or a log line (the unsubstituted text is what is shown).
//!
//! `klab up` and `klab provision` reach it through the use case (`usecase::provision`), which adds
//! the journal, progress, node logs and state; this module knows none of those.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::{Remote, RemoteError, shell_quote, stderr_tail};
use crate::plan::provision::{
    CommandOp, FileContent, FileOp, NodePhase, Op, Phase, PhaseId, ProvisionPlan, Schedule, refs,
};
use crate::plan::secret::{REDACTED, Secret};

/// A run-time value: public, or secret (never shown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Public(String),
    Secret(Secret),
}

impl Val {
    fn expose(&self) -> &str {
        match self {
            Val::Public(s) => s,
            Val::Secret(s) => s.expose(),
        }
    }
}

/// Named values: the caller's inputs and what the phases captured (cluster-wide and per node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values {
    pub cluster: BTreeMap<String, Val>,
    pub nodes: BTreeMap<String, BTreeMap<String, Val>>,
}

impl Values {
    pub fn set_public(&mut self, name: &str, value: impl Into<String>) {
        self.cluster
            .insert(name.to_string(), Val::Public(value.into()));
    }
    pub fn set_secret(&mut self, name: &str, value: Secret) {
        self.cluster.insert(name.to_string(), Val::Secret(value));
    }
    /// A node's own value first, then the cluster's.
    pub fn get(&self, node: &str, name: &str) -> Option<&Val> {
        self.nodes
            .get(node)
            .and_then(|m| m.get(name))
            .or_else(|| self.cluster.get(name))
    }
    fn secrets(&self) -> Vec<&str> {
        self.cluster
            .values()
            .chain(self.nodes.values().flat_map(|m| m.values()))
            .filter_map(|v| match v {
                Val::Secret(s) if !s.expose().is_empty() => Some(s.expose()),
                _ => None,
            })
            .collect()
    }
    /// `text` with every `${klab:NAME}` replaced; the first missing name is the error.
    fn fill(&self, node: &str, text: &str) -> Result<String, String> {
        let mut out = text.to_string();
        for name in refs(text) {
            let v = self.get(node, &name).ok_or_else(|| name.clone())?;
            out = out.replace(&format!("${{klab:{name}}}"), v.expose());
        }
        Ok(out)
    }
}

/// What the runner reports while it works (one progress line per node names the phase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    PhaseStarted {
        phase: PhaseId,
    },
    NodeStarted {
        phase: PhaseId,
        node: String,
    },
    /// The probe says the work is done.
    NodeSkipped {
        phase: PhaseId,
        node: String,
    },
    /// A command or file of the phase (its label, never its filled-in text).
    Step {
        phase: PhaseId,
        node: String,
        what: String,
    },
    /// A command exited with one of its warning codes.
    Warning {
        phase: PhaseId,
        node: String,
        message: String,
    },
    NodeDone {
        phase: PhaseId,
        node: String,
        elapsed: Duration,
    },
}

/// How a node's part of a phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeOutcome {
    Done,
    /// The probe held: nothing was run.
    AlreadyDone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseReport {
    pub phase: PhaseId,
    pub nodes: Vec<(String, NodeOutcome)>,
    pub elapsed: Duration,
    /// Commands that exited with one of their warning codes: what the phase did *not* establish.
    pub warnings: Vec<Warned>,
}

/// A command that only warned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warned {
    pub node: String,
    /// The command's label.
    pub command: String,
    /// The tail of its stderr (secrets redacted): usually why.
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "{node}: phase `{phase}`: `{command}` failed with exit status {status}{}\n  next: {hint}",
        tail(stderr)
    )]
    Failed {
        node: String,
        phase: &'static str,
        command: String,
        status: u32,
        /// Tail only, secrets redacted.
        stderr: String,
        hint: String,
    },
    #[error("{node}: phase `{phase}`: {what}\n  next: {hint}")]
    Remote {
        node: String,
        phase: &'static str,
        what: String,
        #[source]
        source: Box<RemoteError>,
        hint: String,
    },
    #[error("{node}: phase `{phase}` needs the value `{name}`, which nothing provided")]
    MissingValue {
        node: String,
        phase: &'static str,
        name: String,
    },
    #[error("{node}: phase `{phase}`: `{command}` printed no `{value}`")]
    CaptureMissing {
        node: String,
        phase: &'static str,
        command: String,
        value: String,
    },
    #[error(
        "{node}: phase `{phase}`: {path} has unrendered template content (render::resolve_provision first)"
    )]
    Unresolved {
        node: String,
        phase: &'static str,
        path: String,
    },
    #[error(
        "phase `{phase}`: nodes {} share the {value} `{word}`\n  next: give every VM its own (clones of one VM share product_uuid and MACs); kubeadm needs them unique",
        nodes.join(", ")
    )]
    NotUnique {
        phase: &'static str,
        value: String,
        word: String,
        nodes: Vec<String>,
    },
    #[error("phase `{phase}` runs on `{node}`, which has no connection")]
    NoRemote { phase: &'static str, node: String },
}

fn tail(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!("; stderr:\n{}", stderr.trim_end())
    }
}

const GENERIC_HINT: &str =
    "fix it on the node (`klab ssh NODE`), then run `klab up` again: finished phases are skipped";
/// Bound for writing one file.
const FILE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs phases over one connected [`Remote`] per node.
pub struct Runner<'a, R: Remote> {
    remotes: &'a BTreeMap<String, R>,
    /// Nodes at once in a parallel phase (at least 1).
    max_parallel: usize,
    on_event: &'a (dyn Fn(&Event) + Sync),
}

impl<'a, R: Remote> Runner<'a, R> {
    pub fn new(
        remotes: &'a BTreeMap<String, R>,
        max_parallel: usize,
        on_event: &'a (dyn Fn(&Event) + Sync),
    ) -> Self {
        Self {
            remotes,
            max_parallel: max_parallel.max(1),
            on_event,
        }
    }

    /// Every phase in order; stops at the first failing phase (the other nodes of that phase finish
    /// what they are doing first). `values` gains what the phases capture.
    pub async fn run(
        &self,
        plan: &ProvisionPlan,
        values: &mut Values,
    ) -> Result<Vec<PhaseReport>, RunError> {
        let mut reports = Vec::new();
        for phase in &plan.phases {
            reports.push(self.run_phase(phase, values).await?);
        }
        Ok(reports)
    }

    /// One phase on all its nodes, honouring its schedule; then its cross-node checks.
    pub async fn run_phase(
        &self,
        phase: &Phase,
        values: &mut Values,
    ) -> Result<PhaseReport, RunError> {
        let started = Instant::now();
        (self.on_event)(&Event::PhaseStarted { phase: phase.id });
        let mut outcomes = Vec::new();
        let mut warnings = Vec::new();
        match phase.schedule {
            Schedule::Serial => {
                for np in &phase.nodes {
                    let (outcome, mut captured) = self.run_node(phase, np, values).await?;
                    warnings.append(&mut captured.warned);
                    merge(values, &np.node, captured);
                    outcomes.push((np.node.clone(), outcome));
                }
            }
            Schedule::Parallel => {
                let snapshot: &Values = values;
                let results: Vec<_> = futures::stream::iter(phase.nodes.iter())
                    .map(|np| async move { (np, self.run_node(phase, np, snapshot).await) })
                    .buffered(self.max_parallel)
                    .collect()
                    .await;
                let mut first_error = None;
                let mut captured_all = Vec::new();
                for (np, r) in results {
                    match r {
                        Ok((outcome, mut captured)) => {
                            warnings.append(&mut captured.warned);
                            captured_all.push((np.node.clone(), captured));
                            outcomes.push((np.node.clone(), outcome));
                        }
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                for (node, captured) in captured_all {
                    merge(values, &node, captured);
                }
                if let Some(e) = first_error {
                    return Err(e);
                }
            }
        }
        check_unique(phase, values)?;
        Ok(PhaseReport {
            phase: phase.id,
            nodes: outcomes,
            elapsed: started.elapsed(),
            warnings,
        })
    }

    async fn run_node(
        &self,
        phase: &Phase,
        np: &NodePhase,
        values: &Values,
    ) -> Result<(NodeOutcome, Captured), RunError> {
        let node = np.node.as_str();
        let pid = phase.id;
        let remote = self.remotes.get(node).ok_or_else(|| RunError::NoRemote {
            phase: pid.as_str(),
            node: node.to_string(),
        })?;
        let started = Instant::now();
        (self.on_event)(&Event::NodeStarted {
            phase: pid,
            node: node.to_string(),
        });
        let ctx = NodeCtx {
            phase: pid,
            node,
            remote,
            values,
            secrets: values.secrets(),
        };
        if let Some(learned) = ctx.probe(np).await? {
            (self.on_event)(&Event::NodeSkipped {
                phase: pid,
                node: node.to_string(),
            });
            return Ok((NodeOutcome::AlreadyDone, learned));
        }
        let mut captured = Captured::default();
        for op in &np.ops {
            // Values captured earlier in this node's phase count too (the sandbox image, the
            // containerd major version).
            let local = with_captured(values, node, &captured);
            let ctx = NodeCtx {
                phase: pid,
                node,
                remote,
                values: &local,
                secrets: ctx.secrets.clone(),
            };
            if !ctx.applies(op)? {
                continue;
            }
            match op {
                Op::File(f) => {
                    (self.on_event)(&Event::Step {
                        phase: pid,
                        node: node.to_string(),
                        what: format!("write {}", f.path),
                    });
                    ctx.write_file(f).await?;
                }
                Op::Run(c) => {
                    if !c.captures.is_empty()
                        && c.captures
                            .iter()
                            .all(|cap| local.get(node, &cap.value).is_some())
                    {
                        // Resolved once and recorded (the patch version): not again.
                        continue;
                    }
                    (self.on_event)(&Event::Step {
                        phase: pid,
                        node: node.to_string(),
                        what: c.name.clone(),
                    });
                    tracing::debug!(node, phase = pid.as_str(), op = %c.name, "run");
                    let (stdout, warned) = ctx.run_command(c).await?;
                    if let Some(stderr) = warned {
                        captured.warned.push(Warned {
                            node: node.to_string(),
                            command: c.name.clone(),
                            stderr,
                        });
                        (self.on_event)(&Event::Warning {
                            phase: pid,
                            node: node.to_string(),
                            message: format!(
                                "{}: {}",
                                c.name,
                                c.hint.as_deref().unwrap_or("exited with a warning status")
                            ),
                        });
                    }
                    for cap in &c.captures {
                        let v = cap
                            .extract(&stdout)
                            .ok_or_else(|| RunError::CaptureMissing {
                                node: node.to_string(),
                                phase: pid.as_str(),
                                command: c.name.clone(),
                                value: cap.value.clone(),
                            })?;
                        let v = if cap.secret {
                            Val::Secret(Secret::new(v))
                        } else {
                            Val::Public(v)
                        };
                        let target = if cap.cluster {
                            &mut captured.cluster
                        } else {
                            &mut captured.node
                        };
                        target.insert(cap.value.clone(), v);
                    }
                }
            }
        }
        (self.on_event)(&Event::NodeDone {
            phase: pid,
            node: node.to_string(),
            elapsed: started.elapsed(),
        });
        Ok((NodeOutcome::Done, captured))
    }
}

/// What one node's phase captured (and which of its commands only warned).
#[derive(Debug, Default)]
struct Captured {
    node: BTreeMap<String, Val>,
    cluster: BTreeMap<String, Val>,
    warned: Vec<Warned>,
}

fn merge(values: &mut Values, node: &str, c: Captured) {
    values
        .nodes
        .entry(node.to_string())
        .or_default()
        .extend(c.node);
    values.cluster.extend(c.cluster);
}

fn with_captured(values: &Values, node: &str, c: &Captured) -> Values {
    let mut v = values.clone();
    v.nodes
        .entry(node.to_string())
        .or_default()
        .extend(c.node.clone());
    v.cluster.extend(c.cluster.clone());
    v
}

/// Every word of each `unique` value must belong to one node only.
fn check_unique(phase: &Phase, values: &Values) -> Result<(), RunError> {
    for name in &phase.unique {
        let mut owners: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for np in &phase.nodes {
            if let Some(Val::Public(v)) = values.nodes.get(&np.node).and_then(|m| m.get(name)) {
                for word in v.split_whitespace() {
                    owners.entry(word).or_default().insert(np.node.as_str());
                }
            }
        }
        if let Some((word, nodes)) = owners.into_iter().find(|(_, n)| n.len() > 1) {
            return Err(RunError::NotUnique {
                phase: phase.id.as_str(),
                value: name.clone(),
                word: word.to_string(),
                nodes: nodes.into_iter().map(str::to_string).collect(),
            });
        }
    }
    Ok(())
}

/// `sudo -n sh -c '<script>'`: every provisioning command runs as root.
pub fn as_root(script: &str) -> String {
    format!("sudo -n sh -c {}", shell_quote(script))
}

/// The root-side script that writes stdin to `path` atomically with its mode and owner.
pub fn write_file_script(path: &str, mode: u32, owner: &str) -> String {
    let p = shell_quote(path);
    let tmp = shell_quote(&format!("{path}.klab-new"));
    let dir = shell_quote(
        std::path::Path::new(path)
            .parent()
            .and_then(|d| d.to_str())
            .filter(|d| !d.is_empty())
            .unwrap_or("/"),
    );
    format!(
        "set -e; umask 077; mkdir -p {dir}; cat > {tmp}; chown {} {tmp}; chmod {mode:04o} {tmp}; mv -f {tmp} {p}",
        shell_quote(owner)
    )
}

struct NodeCtx<'a, R: Remote> {
    phase: PhaseId,
    node: &'a str,
    remote: &'a R,
    values: &'a Values,
    secrets: Vec<&'a str>,
}

impl<R: Remote> NodeCtx<'_, R> {
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            out = out.replace(s, REDACTED);
        }
        out
    }

    fn missing(&self, name: String) -> RunError {
        RunError::MissingValue {
            node: self.node.to_string(),
            phase: self.phase.as_str(),
            name,
        }
    }

    fn fill(&self, text: &str) -> Result<String, RunError> {
        self.values
            .fill(self.node, text)
            .map_err(|name| self.missing(name))
    }

    /// Whether an op's condition holds; a condition on a value nothing captured is a plan bug.
    fn applies(&self, op: &Op) -> Result<bool, RunError> {
        let Some(w) = op.when() else {
            return Ok(true);
        };
        let v = self
            .values
            .get(self.node, &w.value)
            .ok_or_else(|| self.missing(w.value.clone()))?;
        Ok(w.is.iter().any(|x| x == v.expose()))
    }

    fn content(&self, f: &FileOp) -> Result<String, RunError> {
        match &f.content {
            FileContent::Text { text } => self.fill(text),
            FileContent::Value { value } => self
                .values
                .get(self.node, value)
                .map(|v| v.expose().to_string())
                .ok_or_else(|| self.missing(value.clone())),
            FileContent::Template { .. } => Err(RunError::Unresolved {
                node: self.node.to_string(),
                phase: self.phase.as_str(),
                path: f.path.clone(),
            }),
        }
    }

    fn remote_error(&self, what: String, source: RemoteError, hint: Option<&str>) -> RunError {
        RunError::Remote {
            node: self.node.to_string(),
            phase: self.phase.as_str(),
            what,
            source: Box::new(source),
            hint: hint.unwrap_or(GENERIC_HINT).to_string(),
        }
    }

    /// `Some(values it learned)` when the phase's effect is already in place on the node. A probe
    /// that cannot decide (a value it needs is unknown, a query fails) says "not done".
    async fn probe(&self, np: &NodePhase) -> Result<Option<Captured>, RunError> {
        let Some(p) = &np.probe else {
            return Ok(None);
        };
        // Read-only queries tell which file variant applies (containerd 1.x or 2.x).
        let mut learned = Captured::default();
        for op in &np.ops {
            let Op::Run(c) = op else { continue };
            let local = with_captured(self.values, self.node, &learned);
            if !c.query
                || c.captures
                    .iter()
                    .all(|cap| local.get(self.node, &cap.value).is_some())
            {
                continue;
            }
            let Ok(script) = local.fill(self.node, &c.run) else {
                return Ok(None);
            };
            let out = self
                .remote
                .exec(&as_root(&script), None, Duration::from_secs(c.timeout_secs))
                .await
                .map_err(|e| self.remote_error(format!("probe `{}`", c.name), e, None))?;
            if !c.ok_exit.contains(&out.exit_status) {
                return Ok(None);
            }
            for cap in &c.captures {
                let Some(v) = cap.extract(&out.stdout) else {
                    return Ok(None);
                };
                learned.node.insert(cap.value.clone(), Val::Public(v));
            }
        }
        let local = with_captured(self.values, self.node, &learned);
        let ctx = NodeCtx {
            phase: self.phase,
            node: self.node,
            remote: self.remote,
            values: &local,
            secrets: self.secrets.clone(),
        };
        if p.files_match {
            let mut want: Vec<(String, String)> = Vec::new();
            for op in &np.ops {
                let Op::File(f) = op else { continue };
                match ctx.applies(op) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(_) => return Ok(None),
                }
                let Ok(content) = ctx.content(f) else {
                    return Ok(None);
                };
                let hex: String = Sha256::digest(content.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                want.push((f.path.clone(), hex));
            }
            if !want.is_empty() {
                let paths: Vec<String> = want.iter().map(|(p, _)| shell_quote(p)).collect();
                let cmd = as_root(&format!("sha256sum {} 2>/dev/null", paths.join(" ")));
                let out = self
                    .remote
                    .exec(&cmd, None, FILE_TIMEOUT)
                    .await
                    .map_err(|e| self.remote_error("probe (file checksums)".into(), e, None))?;
                let have: BTreeMap<&str, &str> = out
                    .stdout
                    .lines()
                    .filter_map(|l| l.split_once("  ").map(|(h, p)| (p, h)))
                    .collect();
                if want
                    .iter()
                    .any(|(p, h)| have.get(p.as_str()) != Some(&h.as_str()))
                {
                    return Ok(None);
                }
            }
        }
        if let Some(c) = &p.command {
            let Ok(filled) = local.fill(self.node, c) else {
                return Ok(None);
            };
            let out = self
                .remote
                .exec(&as_root(&filled), None, FILE_TIMEOUT)
                .await
                .map_err(|e| self.remote_error("probe".into(), e, None))?;
            if !out.success() {
                return Ok(None);
            }
        }
        Ok(Some(learned))
    }

    async fn write_file(&self, f: &FileOp) -> Result<(), RunError> {
        let content = self.content(f)?;
        let cmd = as_root(&write_file_script(&f.path, f.mode, &f.owner));
        let out = self
            .remote
            .exec(&cmd, Some(content.as_bytes()), FILE_TIMEOUT)
            .await
            .map_err(|e| self.remote_error(format!("writing {}", f.path), e, None))?;
        if out.success() {
            Ok(())
        } else {
            Err(RunError::Failed {
                node: self.node.to_string(),
                phase: self.phase.as_str(),
                command: format!("write {}", f.path),
                status: out.exit_status,
                stderr: self.redact(&stderr_tail(&out.stderr)),
                hint: "check the disk and the path on the node".into(),
            })
        }
    }

    /// (stdout, `Some(stderr tail)` when it exited with a warning code).
    async fn run_command(&self, c: &CommandOp) -> Result<(String, Option<String>), RunError> {
        let script = self.fill(&c.run)?;
        let hint = c.hint.as_deref().unwrap_or(GENERIC_HINT);
        let out = self
            .remote
            .exec(&as_root(&script), None, Duration::from_secs(c.timeout_secs))
            .await
            .map_err(|e| {
                // The remote error quotes the command it ran: the filled-in text may hold secrets.
                let e = match e {
                    RemoteError::Timeout { node, after, .. } => RemoteError::Timeout {
                        node,
                        command: c.name.clone(),
                        after,
                    },
                    RemoteError::Protocol { node, message } => RemoteError::Protocol {
                        node,
                        message: self.redact(&message),
                    },
                    RemoteError::Failed {
                        node,
                        status,
                        stderr,
                        ..
                    } => RemoteError::Failed {
                        node,
                        command: c.name.clone(),
                        status,
                        stderr: self.redact(&stderr),
                    },
                    other => other,
                };
                self.remote_error(format!("`{}`", c.name), e, Some(hint))
            })?;
        if c.ok_exit.contains(&out.exit_status) {
            return Ok((out.stdout, None));
        }
        if c.warn_exit.contains(&out.exit_status) {
            let stderr = self.redact(stderr_tail(&out.stderr).trim());
            return Ok((out.stdout, Some(stderr)));
        }
        Err(RunError::Failed {
            node: self.node.to_string(),
            phase: self.phase.as_str(),
            command: c.name.clone(),
            status: out.exit_status,
            stderr: self.redact(&stderr_tail(&out.stderr)),
            hint: hint.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::plan::provision::{Capture, Probe, When};
    use crate::provision::recording::{Recorded, RecordingRemote, exit, ok};

    fn command(name: &str, run: &str) -> CommandOp {
        CommandOp {
            name: name.into(),
            run: run.into(),
            timeout_secs: 30,
            ok_exit: vec![0],
            warn_exit: Vec::new(),
            captures: Vec::new(),
            when: None,
            hint: None,
            query: false,
        }
    }

    fn file(path: &str, text: &str) -> FileOp {
        FileOp {
            path: path.into(),
            content: FileContent::Text { text: text.into() },
            mode: 0o600,
            owner: "root:root".into(),
            when: None,
        }
    }

    fn phase(id: PhaseId, schedule: Schedule, nodes: &[&str], ops: Vec<Op>) -> Phase {
        Phase {
            id,
            about: String::new(),
            schedule,
            nodes: nodes
                .iter()
                .map(|n| NodePhase {
                    node: n.to_string(),
                    probe: None,
                    ops: ops.clone(),
                })
                .collect(),
            unique: Vec::new(),
        }
    }

    fn remotes(list: Vec<RecordingRemote>) -> BTreeMap<String, RecordingRemote> {
        list.into_iter()
            .map(|r| (r.node().to_string(), r))
            .collect()
    }

    fn execs(r: &RecordingRemote) -> Vec<(String, Option<String>)> {
        r.calls()
            .into_iter()
            .filter_map(|c| match c {
                Recorded::Exec { command, stdin, .. } => Some((
                    command,
                    stdin.map(|s| String::from_utf8_lossy(&s).into_owned()),
                )),
                Recorded::Upload { .. } => None,
            })
            .collect()
    }

    fn quiet(_: &Event) {}

    #[test]
    fn root_wrapping_and_file_script_are_exact() {
        assert_eq!(as_root("echo hi"), "sudo -n sh -c 'echo hi'");
        assert_eq!(
            write_file_script("/etc/klab/kubeadm/join.yaml", 0o600, "root:root"),
            "set -e; umask 077; mkdir -p /etc/klab/kubeadm; cat > /etc/klab/kubeadm/join.yaml.klab-new; \
             chown root:root /etc/klab/kubeadm/join.yaml.klab-new; chmod 0600 /etc/klab/kubeadm/join.yaml.klab-new; \
             mv -f /etc/klab/kubeadm/join.yaml.klab-new /etc/klab/kubeadm/join.yaml"
        );
    }

    #[tokio::test]
    async fn files_commands_captures_and_conditions() {
        let detect = command("detect", "cat /etc/os-release").with_capture("pkg", "pkg=");
        let dnf_only = CommandOp {
            when: Some(When {
                value: "pkg".into(),
                is: vec!["dnf".into()],
            }),
            ..command("dnf only", "dnf install -y x")
        };
        let plan = ProvisionPlan {
            inputs: Vec::new(),
            phases: vec![phase(
                PhaseId::Preflight,
                Schedule::Serial,
                &["cp1"],
                vec![
                    Op::Run(detect),
                    Op::Run(dnf_only),
                    Op::File(file(
                        "/etc/klab/join.yaml",
                        "token: ${klab:bootstrap-token}\n",
                    )),
                    Op::Run(command("uses pkg", "echo ${klab:pkg}")),
                ],
            )],
        };
        let r = remotes(vec![RecordingRemote::new("cp1").on(
            "sudo -n sh -c 'cat /etc/os-release'",
            ok("os=debian-12\npkg=apt\n"),
        )]);
        let mut values = Values::default();
        values.set_secret("bootstrap-token", Secret::new("abcdef.0123456789abcdef"));
        let reports = Runner::new(&r, 4, &quiet)
            .run(&plan, &mut values)
            .await
            .unwrap();
        assert_eq!(reports[0].nodes, [("cp1".to_string(), NodeOutcome::Done)]);
        assert_eq!(
            execs(&r["cp1"]),
            [
                ("sudo -n sh -c 'cat /etc/os-release'".to_string(), None),
                (
                    "sudo -n sh -c 'set -e; umask 077; mkdir -p /etc/klab; cat > /etc/klab/join.yaml.klab-new; \
                     chown root:root /etc/klab/join.yaml.klab-new; chmod 0600 /etc/klab/join.yaml.klab-new; \
                     mv -f /etc/klab/join.yaml.klab-new /etc/klab/join.yaml'"
                        .to_string(),
                    Some("token: abcdef.0123456789abcdef\n".to_string())
                ),
                ("sudo -n sh -c 'echo apt'".to_string(), None),
            ]
        );
        assert_eq!(
            values.get("cp1", "pkg"),
            Some(&Val::Public("apt".to_string()))
        );
    }

    #[tokio::test]
    async fn a_holding_probe_skips_the_node() {
        let content = "overlay\n";
        let mut ph = phase(
            PhaseId::Preflight,
            Schedule::Parallel,
            &["cp1", "w1"],
            vec![
                Op::File(file("/etc/modules-load.d/k.conf", content)),
                Op::Run(command("modprobe", "modprobe overlay")),
            ],
        );
        for np in &mut ph.nodes {
            np.probe = Some(Probe {
                files_match: true,
                command: Some("test -d /sys/module/overlay".into()),
            });
        }
        // `printf 'overlay\n' | sha256sum`, as the node prints it.
        let sum = "5971fc5991ae2b514c4e25cbfaa154aa191b4230c4201e33c00da182209f53fd  /etc/modules-load.d/k.conf\n";
        let probe_files = "sudo -n sh -c 'sha256sum /etc/modules-load.d/k.conf 2>/dev/null'";
        let probe_cmd = "sudo -n sh -c 'test -d /sys/module/overlay'";
        let r = remotes(vec![
            RecordingRemote::new("cp1")
                .on(probe_files, ok(sum))
                .on(probe_cmd, ok("")),
            // w1 has another content: not done.
            RecordingRemote::new("w1")
                .on(probe_files, ok("0000  /etc/modules-load.d/k.conf\n"))
                .on(probe_cmd, ok("")),
        ]);
        let mut values = Values::default();
        let report = Runner::new(&r, 4, &quiet)
            .run_phase(&ph, &mut values)
            .await
            .unwrap();
        assert_eq!(
            report.nodes,
            [
                ("cp1".to_string(), NodeOutcome::AlreadyDone),
                ("w1".to_string(), NodeOutcome::Done)
            ]
        );
        let cp1: Vec<String> = execs(&r["cp1"]).into_iter().map(|(c, _)| c).collect();
        assert_eq!(cp1, [probe_files, probe_cmd]);
        let w1: Vec<String> = execs(&r["w1"]).into_iter().map(|(c, _)| c).collect();
        assert_eq!(w1.len(), 3, "{w1:?}");
        assert_eq!(w1[0], probe_files);
        assert_eq!(w1[2], "sudo -n sh -c 'modprobe overlay'");
    }

    #[tokio::test]
    async fn probes_run_queries_to_pick_the_file_variant() {
        let major = CommandOp {
            query: true,
            ..command("major", "containerd --version").with_capture("containerd-major", "m=")
        };
        let variant = |is: &str, text: &str| {
            Op::File(FileOp {
                when: Some(When {
                    value: "containerd-major".into(),
                    is: vec![is.into()],
                }),
                ..file("/etc/containerd/config.toml", text)
            })
        };
        let mut ph = phase(
            PhaseId::Containerd,
            Schedule::Serial,
            &["cp1"],
            vec![
                Op::Run(major),
                variant("1", "version = 2\n"),
                variant("2", "overlay\n"),
                Op::Run(command("restart", "systemctl restart containerd")),
            ],
        );
        ph.nodes[0].probe = Some(Probe {
            files_match: true,
            command: None,
        });
        let r = remotes(vec![
            RecordingRemote::new("cp1")
                .on("sudo -n sh -c 'containerd --version'", ok("m=2\n"))
                .on(
                    "sudo -n sh -c 'sha256sum /etc/containerd/config.toml 2>/dev/null'",
                    ok("5971fc5991ae2b514c4e25cbfaa154aa191b4230c4201e33c00da182209f53fd  /etc/containerd/config.toml\n"),
                ),
        ]);
        let mut values = Values::default();
        let report = Runner::new(&r, 1, &quiet)
            .run_phase(&ph, &mut values)
            .await
            .unwrap();
        assert_eq!(
            report.nodes,
            [("cp1".to_string(), NodeOutcome::AlreadyDone)]
        );
        // Nothing was restarted, and what the probe learned is kept.
        assert!(!r["cp1"].commands().iter().any(|c| c.contains("restart")));
        assert_eq!(
            values.get("cp1", "containerd-major"),
            Some(&Val::Public("2".into()))
        );
    }

    #[tokio::test]
    async fn failure_names_node_phase_command_status_stderr_and_next_step() {
        let c = CommandOp {
            hint: Some("`kubeadm reset -f` on the node, then `klab up` again".into()),
            ..command(
                "kubeadm join",
                "kubeadm join --token ${klab:bootstrap-token}",
            )
        };
        let ph = phase(
            PhaseId::JoinWorkers,
            Schedule::Parallel,
            &["w1"],
            vec![Op::Run(c)],
        );
        let r = remotes(vec![RecordingRemote::new("w1").with_default(exit(
            1,
            "line 1\nerror: token abcdef.0123456789abcdef is invalid\n",
        ))]);
        let mut values = Values::default();
        values.set_secret("bootstrap-token", Secret::new("abcdef.0123456789abcdef"));
        let err = Runner::new(&r, 4, &quiet)
            .run_phase(&ph, &mut values)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "w1: phase `join-workers`: `kubeadm join` failed with exit status 1; stderr:\n\
             line 1\nerror: token <redacted> is invalid\n  \
             next: `kubeadm reset -f` on the node, then `klab up` again"
        );
        assert!(!format!("{err:?}").contains("0123456789abcdef"));
    }

    #[tokio::test]
    async fn warnings_missing_values_and_resolved_once() {
        let clock = CommandOp {
            warn_exit: vec![1],
            hint: Some("clock not synchronized".into()),
            ..command("clock", "timedatectl")
        };
        let resolve = command("resolve", "apt-cache madison kubeadm")
            .with_capture("kubernetes-version", "v=");
        let ph = phase(
            PhaseId::Preflight,
            Schedule::Serial,
            &["cp1"],
            vec![Op::Run(clock), Op::Run(resolve)],
        );
        let r = remotes(vec![RecordingRemote::new("cp1").with_default(exit(1, ""))]);
        let events = Mutex::new(Vec::new());
        let record = |e: &Event| events.lock().unwrap().push(e.clone());
        let mut values = Values::default();
        values.set_public("kubernetes-version", "1.36.4");
        let report = Runner::new(&r, 1, &record)
            .run_phase(&ph, &mut values)
            .await
            .unwrap();
        // The report keeps what only warned, so nobody calls it established.
        assert_eq!(
            report.warnings,
            [Warned {
                node: "cp1".into(),
                command: "clock".into(),
                stderr: String::new(),
            }]
        );
        // The recorded version is not resolved again.
        assert_eq!(execs(&r["cp1"]).len(), 1);
        assert!(events.lock().unwrap().contains(&Event::Warning {
            phase: PhaseId::Preflight,
            node: "cp1".into(),
            message: "clock: clock not synchronized".into(),
        }));

        let ph = phase(
            PhaseId::KubeadmInit,
            Schedule::Serial,
            &["cp1"],
            vec![Op::File(file(
                "/etc/k/init.yaml",
                "key: ${klab:certificate-key}\n",
            ))],
        );
        let r = remotes(vec![RecordingRemote::new("cp1")]);
        let err = Runner::new(&r, 1, &quiet)
            .run_phase(&ph, &mut Values::default())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cp1: phase `kubeadm-init` needs the value `certificate-key`, which nothing provided"
        );
        assert!(r["cp1"].calls().is_empty(), "nothing ran");
    }

    #[tokio::test]
    async fn a_timeout_names_the_command_not_its_filled_text() {
        let c = command(
            "kubeadm join",
            "kubeadm join --token ${klab:bootstrap-token}",
        );
        let ph = phase(
            PhaseId::JoinWorkers,
            Schedule::Serial,
            &["w1"],
            vec![Op::Run(c)],
        );
        let r = remotes(vec![
            RecordingRemote::new("w1").with_default(crate::provision::recording::Reply::Timeout),
        ]);
        let mut values = Values::default();
        values.set_secret("bootstrap-token", Secret::new("abcdef.0123456789abcdef"));
        let err = Runner::new(&r, 1, &quiet)
            .run_phase(&ph, &mut values)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("w1: phase `join-workers`: `kubeadm join`\n  next: {GENERIC_HINT}")
        );
        let source = std::error::Error::source(&err).expect("source").to_string();
        assert_eq!(source, "w1: `kubeadm join` timed out after 30s");
    }

    #[tokio::test]
    async fn shared_product_uuid_is_refused() {
        let mut ph = phase(
            PhaseId::DetectOs,
            Schedule::Parallel,
            &["a", "b", "c"],
            vec![Op::Run(
                command("identity", "cat /sys/class/dmi/id/product_uuid")
                    .with_capture("product-uuid", "product-uuid="),
            )],
        );
        ph.unique = vec!["product-uuid".into()];
        let r = remotes(vec![
            RecordingRemote::new("a").with_default(ok("product-uuid=1111\n")),
            RecordingRemote::new("b").with_default(ok("product-uuid=2222\n")),
            RecordingRemote::new("c").with_default(ok("product-uuid=1111\n")),
        ]);
        let err = Runner::new(&r, 3, &quiet)
            .run_phase(&ph, &mut Values::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("phase `detect-os`: nodes a, c share the product-uuid `1111`"),
            "{err}"
        );
    }

    /// A remote whose `rendezvous` command waits until `n` nodes have reached it.
    struct Gate {
        inner: RecordingRemote,
        barrier: std::sync::Arc<tokio::sync::Barrier>,
    }

    impl Remote for Gate {
        fn node(&self) -> &str {
            self.inner.node()
        }
        async fn exec(
            &self,
            command: &str,
            stdin: Option<&[u8]>,
            timeout: Duration,
        ) -> Result<super::super::CommandOutput, RemoteError> {
            if command.contains("rendezvous") {
                self.barrier.wait().await;
            }
            self.inner.exec(command, stdin, timeout).await
        }
        async fn upload(&self, path: &str, data: &[u8], mode: u32) -> Result<(), RemoteError> {
            self.inner.upload(path, data, mode).await
        }
    }

    #[tokio::test]
    async fn parallel_phases_run_nodes_together_serial_ones_one_by_one() {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let gates: BTreeMap<String, Gate> = ["w1", "w2"]
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    Gate {
                        inner: RecordingRemote::new(n),
                        barrier: barrier.clone(),
                    },
                )
            })
            .collect();
        let par = phase(
            PhaseId::JoinWorkers,
            Schedule::Parallel,
            &["w1", "w2"],
            vec![Op::Run(command("meet", "rendezvous"))],
        );
        // Both nodes must be inside the phase at once, or the barrier never opens.
        tokio::time::timeout(
            Duration::from_secs(5),
            Runner::new(&gates, 2, &quiet).run_phase(&par, &mut Values::default()),
        )
        .await
        .expect("parallel nodes meet")
        .unwrap();

        let r = remotes(vec![
            RecordingRemote::new("cp2"),
            RecordingRemote::new("cp3"),
        ]);
        let ser = phase(
            PhaseId::JoinControlPlane,
            Schedule::Serial,
            &["cp2", "cp3"],
            vec![Op::Run(command("join", "kubeadm join"))],
        );
        let events = Mutex::new(Vec::new());
        let record = |e: &Event| {
            if let Event::NodeStarted { node, .. } | Event::NodeDone { node, .. } = e {
                let kind = if matches!(e, Event::NodeStarted { .. }) {
                    "start"
                } else {
                    "done"
                };
                events.lock().unwrap().push(format!("{kind} {node}"));
            }
        };
        Runner::new(&r, 4, &record)
            .run_phase(&ser, &mut Values::default())
            .await
            .unwrap();
        assert_eq!(
            *events.lock().unwrap(),
            ["start cp2", "done cp2", "start cp3", "done cp3"]
        );
    }

    impl CommandOp {
        fn with_capture(mut self, value: &str, prefix: &str) -> Self {
            self.captures.push(Capture {
                value: value.into(),
                line_prefix: Some(prefix.into()),
                secret: false,
                cluster: value == "kubernetes-version",
            });
            self
        }
    }
}
