//! Provisioning over SSH: the `Remote` seam, the russh implementation and the step runner.

pub mod calico;
pub mod identity;
pub mod recording;
pub mod runner;
pub mod ssh;

use std::time::Duration;

/// Output of one remote command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandOutput {
    pub exit_status: u32,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.exit_status == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "{node}: the node presented a host key klab did not generate for it; refusing to log in \
         (expected {expected}, presented {presented})"
    )]
    HostKeyMismatch {
        node: String,
        expected: String,
        presented: String,
    },
    #[error("{node}: cannot connect to {addr}: {message}")]
    Connect {
        node: String,
        addr: String,
        message: String,
    },
    #[error("{node}: authentication as `{user}` refused")]
    Auth { node: String, user: String },
    #[error("{node}: `{command}` timed out after {after:?}")]
    Timeout {
        node: String,
        command: String,
        after: Duration,
    },
    #[error("{node}: ssh: {message}")]
    Protocol { node: String, message: String },
    /// A command ran but exited non-zero (or was killed); `stderr` holds only its tail.
    #[error(
        "{node}: `{command}` failed with exit status {status}{}",
        stderr_suffix(stderr)
    )]
    Failed {
        node: String,
        command: String,
        status: u32,
        stderr: String,
    },
    /// Key material handed to the SSH client does not parse.
    #[error("{node}: invalid {what}: {message}")]
    InvalidKey {
        node: String,
        what: String,
        message: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!("; stderr:\n{}", stderr.trim_end())
    }
}

/// How much of a failed command's stderr an error keeps.
pub const STDERR_TAIL_LINES: usize = 20;
const STDERR_TAIL_BYTES: usize = 4000;

/// The last [`STDERR_TAIL_LINES`] lines (at most ~4 KB) of a command's stderr.
pub fn stderr_tail(stderr: &str) -> String {
    let trimmed = stderr.trim_end();
    let lines: Vec<&str> = trimmed.lines().collect();
    let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
    let mut tail = lines[start..].join("\n");
    if tail.len() > STDERR_TAIL_BYTES {
        let mut cut = tail.len() - STDERR_TAIL_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = format!("…{}", &tail[cut..]);
    }
    tail
}

/// Quotes one word for a POSIX shell; the planner's quoting, so a command is quoted the same way
/// whether the plan or the executor builds it.
pub use crate::plan::provision::sh_quote as shell_quote;

/// One connected node. Implemented by the russh client and by a recording double in tests.
#[allow(async_fn_in_trait)]
pub trait Remote: Send + Sync {
    fn node(&self) -> &str;
    /// Run a command through `sh -c` semantics of the login shell; stdin optional.
    async fn exec(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<CommandOutput, RemoteError>;
    /// Write a file (via `sudo tee` semantics are the caller's business: this writes as the user).
    async fn upload(&self, path: &str, data: &[u8], mode: u32) -> Result<(), RemoteError>;

    /// Runs a command and returns its stdout; a non-zero exit is [`RemoteError::Failed`] with the
    /// command, the status and the tail of stderr.
    async fn exec_checked(&self, command: &str, timeout: Duration) -> Result<String, RemoteError> {
        let out = self.exec(command, None, timeout).await?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(RemoteError::Failed {
                node: self.node().to_string(),
                command: command.to_string(),
                status: out.exit_status,
                stderr: stderr_tail(&out.stderr),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(
            shell_quote("/etc/kubernetes/admin.conf"),
            "/etc/kubernetes/admin.conf"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
    }

    #[test]
    fn stderr_tail_keeps_last_lines() {
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        let tail = stderr_tail(&text);
        assert_eq!(tail.lines().count(), STDERR_TAIL_LINES);
        assert!(tail.starts_with("line 30"));
        assert!(tail.ends_with("line 49"));
    }

    #[test]
    fn stderr_tail_bounds_bytes_on_char_boundary() {
        let text = "é".repeat(10_000);
        let tail = stderr_tail(&text);
        assert!(tail.len() <= STDERR_TAIL_BYTES + "…".len() + 1);
        assert!(tail.starts_with('…'));
    }

    #[test]
    fn failed_error_names_node_command_status_and_stderr() {
        let e = RemoteError::Failed {
            node: "cp1".into(),
            command: "kubeadm init".into(),
            status: 2,
            stderr: "boom".into(),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("cp1: `kubeadm init` failed with exit status 2"),
            "{msg}"
        );
        assert!(msg.ends_with("boom"), "{msg}");
        let quiet = RemoteError::Failed {
            node: "cp1".into(),
            command: "false".into(),
            status: 1,
            stderr: " \n".into(),
        };
        assert!(!quiet.to_string().contains("stderr"));
    }

    #[test]
    fn mismatch_error_says_refusing() {
        let e = RemoteError::HostKeyMismatch {
            node: "w1".into(),
            expected: "SHA256:aaa".into(),
            presented: "SHA256:bbb".into(),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("klab did not generate for it; refusing to log in"),
            "{msg}"
        );
        assert!(
            msg.contains("SHA256:aaa") && msg.contains("SHA256:bbb"),
            "{msg}"
        );
    }
}
