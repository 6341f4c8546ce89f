//! Provisioning over SSH: the `Remote` seam, the russh implementation and the step runner.

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
    #[error("{node}: host key mismatch: expected {expected}, the server presented {presented}")]
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
}

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
}
