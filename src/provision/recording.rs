//! A [`Remote`] double for provisioner tests: records every exec and upload, and answers from a
//! script of canned replies (exact command or longest matching prefix; a rule with several
//! replies plays them in order and then repeats the last one, which models polling).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{CommandOutput, Remote, RemoteError};

/// One call the code under test made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Exec {
        command: String,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    },
    Upload {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
}

/// What a scripted command answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Output(CommandOutput),
    /// The command does not finish: [`RemoteError::Timeout`] with the caller's timeout.
    Timeout,
    /// The connection breaks: [`RemoteError::Protocol`] with this message.
    Disconnected(String),
}

/// Exit 0 with this stdout.
pub fn ok(stdout: &str) -> Reply {
    Reply::Output(CommandOutput {
        exit_status: 0,
        stdout: stdout.to_string(),
        stderr: String::new(),
    })
}

/// This exit status with this stderr.
pub fn exit(status: u32, stderr: &str) -> Reply {
    Reply::Output(CommandOutput {
        exit_status: status,
        stdout: String::new(),
        stderr: stderr.to_string(),
    })
}

#[derive(Debug)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

#[derive(Debug)]
struct Rule {
    pattern: Pattern,
    replies: Vec<Reply>,
    used: usize,
}

#[derive(Debug, Default)]
struct Inner {
    rules: Vec<Rule>,
    calls: Vec<Recorded>,
    failing_uploads: Vec<(String, Reply)>,
}

#[derive(Debug)]
pub struct RecordingRemote {
    node: String,
    default: Reply,
    inner: Mutex<Inner>,
}

impl RecordingRemote {
    /// Unknown commands succeed with empty output; uploads succeed.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            default: ok(""),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// What a command no rule matches answers.
    pub fn with_default(mut self, reply: Reply) -> Self {
        self.default = reply;
        self
    }

    /// `command` (exactly) answers `reply`.
    pub fn on(self, command: &str, reply: Reply) -> Self {
        self.on_seq(command, vec![reply])
    }

    /// `command` answers these replies in turn, then keeps answering the last one.
    pub fn on_seq(self, command: &str, replies: Vec<Reply>) -> Self {
        self.push(Pattern::Exact(command.to_string()), replies)
    }

    /// Every command starting with `prefix` answers `reply` (the longest prefix wins; exact
    /// rules win over prefixes).
    pub fn on_prefix(self, prefix: &str, reply: Reply) -> Self {
        self.on_prefix_seq(prefix, vec![reply])
    }

    pub fn on_prefix_seq(self, prefix: &str, replies: Vec<Reply>) -> Self {
        self.push(Pattern::Prefix(prefix.to_string()), replies)
    }

    /// Uploads to `path` fail: an [`Reply::Output`] becomes [`RemoteError::Failed`], the others as
    /// for exec.
    pub fn fail_upload(self, path: &str, reply: Reply) -> Self {
        self.lock().failing_uploads.push((path.to_string(), reply));
        self
    }

    fn push(self, pattern: Pattern, replies: Vec<Reply>) -> Self {
        let replies = if replies.is_empty() {
            vec![ok("")]
        } else {
            replies
        };
        self.lock().rules.push(Rule {
            pattern,
            replies,
            used: 0,
        });
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock has already failed; keep the log readable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Recorded> {
        self.lock().calls.clone()
    }

    /// The commands executed so far (uploads left out), in order.
    pub fn commands(&self) -> Vec<String> {
        self.lock()
            .calls
            .iter()
            .filter_map(|c| match c {
                Recorded::Exec { command, .. } => Some(command.clone()),
                Recorded::Upload { .. } => None,
            })
            .collect()
    }

    /// The uploads so far as (path, data, mode), in order.
    pub fn uploads(&self) -> Vec<(String, Vec<u8>, u32)> {
        self.lock()
            .calls
            .iter()
            .filter_map(|c| match c {
                Recorded::Upload { path, data, mode } => Some((path.clone(), data.clone(), *mode)),
                Recorded::Exec { .. } => None,
            })
            .collect()
    }

    fn answer(&self, command: &str) -> Reply {
        let mut inner = self.lock();
        let exact = inner
            .rules
            .iter()
            .position(|r| matches!(&r.pattern, Pattern::Exact(c) if c == command));
        let chosen = exact.or_else(|| {
            inner
                .rules
                .iter()
                .enumerate()
                .filter_map(|(i, r)| match &r.pattern {
                    Pattern::Prefix(p) if command.starts_with(p.as_str()) => Some((i, p.len())),
                    _ => None,
                })
                // Earliest rule wins among equally long prefixes.
                .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
                .map(|(i, _)| i)
        });
        match chosen {
            Some(i) => {
                let rule = &mut inner.rules[i];
                let reply = rule.replies[rule.used.min(rule.replies.len() - 1)].clone();
                rule.used += 1;
                reply
            }
            None => self.default.clone(),
        }
    }

    fn to_result(
        &self,
        command: &str,
        reply: Reply,
        timeout: Duration,
    ) -> Result<CommandOutput, RemoteError> {
        match reply {
            Reply::Output(out) => Ok(out),
            Reply::Timeout => Err(RemoteError::Timeout {
                node: self.node.clone(),
                command: command.to_string(),
                after: timeout,
            }),
            Reply::Disconnected(message) => Err(RemoteError::Protocol {
                node: self.node.clone(),
                message,
            }),
        }
    }
}

impl Remote for RecordingRemote {
    fn node(&self) -> &str {
        &self.node
    }

    async fn exec(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<CommandOutput, RemoteError> {
        self.lock().calls.push(Recorded::Exec {
            command: command.to_string(),
            stdin: stdin.map(<[u8]>::to_vec),
            timeout,
        });
        let reply = self.answer(command);
        self.to_result(command, reply, timeout)
    }

    async fn upload(&self, path: &str, data: &[u8], mode: u32) -> Result<(), RemoteError> {
        let failure = {
            let mut inner = self.lock();
            inner.calls.push(Recorded::Upload {
                path: path.to_string(),
                data: data.to_vec(),
                mode,
            });
            inner
                .failing_uploads
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, r)| r.clone())
        };
        let command = format!("upload {path}");
        match failure {
            None => Ok(()),
            Some(reply) => {
                let out = self.to_result(&command, reply, Duration::ZERO)?;
                Err(RemoteError::Failed {
                    node: self.node.clone(),
                    command,
                    status: out.exit_status,
                    stderr: super::stderr_tail(&out.stderr),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn records_execs_and_uploads_in_order() {
        let r = RecordingRemote::new("cp1");
        r.exec("hostname", None, T).await.unwrap();
        r.upload("/etc/x", b"data", 0o600).await.unwrap();
        r.exec("cat", Some(b"in"), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            r.calls(),
            vec![
                Recorded::Exec {
                    command: "hostname".into(),
                    stdin: None,
                    timeout: T
                },
                Recorded::Upload {
                    path: "/etc/x".into(),
                    data: b"data".to_vec(),
                    mode: 0o600
                },
                Recorded::Exec {
                    command: "cat".into(),
                    stdin: Some(b"in".to_vec()),
                    timeout: Duration::from_secs(1)
                },
            ]
        );
        assert_eq!(r.commands(), vec!["hostname", "cat"]);
        assert_eq!(
            r.uploads(),
            vec![("/etc/x".into(), b"data".to_vec(), 0o600)]
        );
        assert_eq!(r.node(), "cp1");
    }

    #[tokio::test]
    async fn exact_beats_prefix_and_longest_prefix_wins() {
        let r = RecordingRemote::new("cp1")
            .on_prefix("kubeadm", ok("short"))
            .on_prefix("kubeadm init", ok("long"))
            .on("kubeadm init --dry-run", ok("exact"));
        let out = |c: &'static str| {
            let r = &r;
            async move { r.exec(c, None, T).await.unwrap().stdout }
        };
        assert_eq!(out("kubeadm init --dry-run").await, "exact");
        assert_eq!(out("kubeadm init --config x").await, "long");
        assert_eq!(out("kubeadm join").await, "short");
        assert_eq!(out("hostname").await, "");
    }

    #[tokio::test]
    async fn sequences_play_in_order_then_repeat_last() {
        let r = RecordingRemote::new("cp1").on_seq(
            "cloud-init status",
            vec![exit(1, "running"), exit(1, "running"), ok("done")],
        );
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(
                r.exec("cloud-init status", None, T)
                    .await
                    .unwrap()
                    .exit_status,
            );
        }
        assert_eq!(statuses, vec![1, 1, 0, 0, 0]);
    }

    #[tokio::test]
    async fn default_and_error_replies() {
        let r = RecordingRemote::new("w1")
            .with_default(exit(127, "not found"))
            .on("sleep 100", Reply::Timeout)
            .on("reboot", Reply::Disconnected("gone".into()));
        let out = r.exec("whatever", None, T).await.unwrap();
        assert_eq!(out.exit_status, 127);
        assert!(matches!(
            r.exec("sleep 100", None, T).await,
            Err(RemoteError::Timeout { after, .. }) if after == T
        ));
        assert!(matches!(
            r.exec("reboot", None, T).await,
            Err(RemoteError::Protocol { message, .. }) if message == "gone"
        ));
    }

    #[tokio::test]
    async fn exec_checked_reports_failure_with_stderr() {
        let r = RecordingRemote::new("cp1")
            .on("true", ok("fine\n"))
            .on("false", exit(3, "bad thing\n"));
        assert_eq!(r.exec_checked("true", T).await.unwrap(), "fine\n");
        match r.exec_checked("false", T).await {
            Err(RemoteError::Failed {
                node,
                command,
                status,
                stderr,
            }) => {
                assert_eq!(
                    (node.as_str(), command.as_str(), status),
                    ("cp1", "false", 3)
                );
                assert_eq!(stderr, "bad thing");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn failing_upload_is_recorded_and_reported() {
        let r = RecordingRemote::new("cp1").fail_upload("/etc/ro", exit(1, "read-only"));
        r.upload("/etc/ok", b"a", 0o644).await.unwrap();
        let err = r.upload("/etc/ro", b"b", 0o644).await.unwrap_err();
        assert!(err.to_string().contains("upload /etc/ro"), "{err}");
        assert!(err.to_string().contains("read-only"), "{err}");
        assert_eq!(r.uploads().len(), 2);
    }
}
