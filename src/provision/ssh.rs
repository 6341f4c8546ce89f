//! The russh client: one TCP connection per node, host key pinned to the key klab generated for
//! that node, public-key login, commands over multiplexed exec channels (so one [`SshSession`] can
//! serve several tasks at once through `&self`), uploads by piping into `cat` (no sftp needed).

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect, Sig, client};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{CommandOutput, Remote, RemoteError, shell_quote};
use crate::keys;

/// Where and how to log in to one node.
#[derive(Clone)]
pub struct SshTarget {
    pub node: String,
    pub addr: SocketAddr,
    pub user: String,
    /// The user's private key (OpenSSH PEM). Never printed.
    pub user_private_key: String,
    /// The host key klab generated for this node (`ssh-ed25519 AAAA… [comment]`); the only key
    /// accepted from the server.
    pub host_public_key: String,
}

impl fmt::Debug for SshTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshTarget")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("user_private_key", &"<redacted>")
            .field("host_public_key", &self.host_public_key)
            .finish()
    }
}

/// Why [`wait_for_ssh`] is trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// TCP refused / unreachable / reset, or the handshake broke off or took too long.
    Unreachable,
    /// sshd answered with a key klab did not generate (yet): cloud-init may not have installed it.
    HostKeyMismatch,
    /// Anything else the server said during the handshake.
    Other,
}

/// Progress of [`wait_for_ssh`], for progress lines and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshWaitEvent {
    /// Attempt `attempt` failed; the next one starts after `delay`.
    Retrying {
        attempt: u32,
        reason: RetryReason,
        /// The attempt's error, already formatted (it names node and address).
        error: String,
        delay: Duration,
    },
    /// Logged in on attempt `attempts`, `elapsed` after the wait began.
    Connected { attempts: u32, elapsed: Duration },
}

/// Liveness of an idle session is checked with keepalives (15 s, 4 misses) instead of an
/// inactivity timeout: long quiet commands such as `kubeadm init` must not drop the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 4;
/// One connection attempt inside [`wait_for_ssh`] never takes longer than this, so a half-open
/// TCP connection to a booting guest cannot eat the whole wait.
const ATTEMPT_CAP: Duration = Duration::from_secs(20);
const BACKOFF_START: Duration = Duration::from_millis(500);
// A refused connection costs the guest next to nothing; a short ceiling keeps "sshd is up" → "connected" tight.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Default bound for [`Remote::upload`], which has no timeout parameter.
pub const DEFAULT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The client-side handler: accepts exactly the pinned host key and remembers what the server
/// presented otherwise, so the error can show both fingerprints.
struct PinnedHostKey {
    expected: PublicKey,
    presented: Arc<Mutex<Option<String>>>,
}

impl PinnedHostKey {
    fn remember(&self, fingerprint: String) {
        // A poisoned lock only loses the diagnostic, never the refusal.
        if let Ok(mut slot) = self.presented.lock() {
            *slot = Some(fingerprint);
        }
    }
}

impl client::Handler for PinnedHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if key.key_data() == self.expected.key_data() {
                    Ok(true)
                } else {
                    self.remember(keys::fingerprint_of(key));
                    Ok(false)
                }
            }
            // klab pins bare keys; a certificate is refused even if signed by anyone.
            PublicKeyOrCertificate::Certificate(cert) => {
                let key = PublicKey::new(cert.public_key().clone(), "");
                self.remember(format!("certificate for {}", keys::fingerprint_of(&key)));
                Ok(false)
            }
        }
    }
}

/// A logged-in connection to one node. Cheap to share: all methods take `&self` and every
/// command gets its own channel on the one connection.
pub struct SshSession {
    node: String,
    addr: SocketAddr,
    handle: client::Handle<PinnedHostKey>,
    upload_timeout: Duration,
}

impl fmt::Debug for SshSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshSession")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn client_config() -> Arc<client::Config> {
    Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..Default::default()
    })
}

/// One attempt: TCP connect, handshake with the pinned host key, public-key login, all within
/// `timeout`.
pub async fn connect(target: &SshTarget, timeout: Duration) -> Result<SshSession, RemoteError> {
    let node = target.node.clone();
    let expected =
        keys::parse_public(&target.host_public_key).map_err(|e| RemoteError::InvalidKey {
            node: node.clone(),
            what: "pinned host key".into(),
            message: e.to_string(),
        })?;
    let user_key =
        keys::parse_private(&target.user_private_key).map_err(|e| RemoteError::InvalidKey {
            node: node.clone(),
            what: "user private key".into(),
            message: e.to_string(),
        })?;
    let expected_fp = keys::fingerprint_of(&expected);
    let presented = Arc::new(Mutex::new(None));
    let handler = PinnedHostKey {
        expected,
        presented: presented.clone(),
    };
    let connect_err = |message: String| RemoteError::Connect {
        node: node.clone(),
        addr: target.addr.to_string(),
        message,
    };

    let attempt = async {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(node = %node, "set_nodelay failed: {e}");
        }
        let mut handle = match client::connect_stream(client_config(), stream, handler).await {
            Ok(h) => h,
            Err(russh::Error::UnknownKey) => {
                let presented = presented
                    .lock()
                    .ok()
                    .and_then(|slot| slot.clone())
                    .unwrap_or_else(|| "an unknown key".to_string());
                return Err(RemoteError::HostKeyMismatch {
                    node: node.clone(),
                    expected: expected_fp.clone(),
                    presented,
                });
            }
            Err(e) => return Err(connect_err(format!("ssh handshake failed: {e}"))),
        };
        // Ed25519 keys take no hash; RSA user keys (not generated by klab) get the best the
        // server supports.
        let hash = if user_key.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| protocol(&node, &e))?
                .flatten()
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(
                target.user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(user_key), hash),
            )
            .await
            .map_err(|e| protocol(&node, &e))?;
        if !auth.success() {
            let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
            return Err(RemoteError::Auth {
                node: node.clone(),
                user: target.user.clone(),
            });
        }
        Ok(SshSession {
            node: node.clone(),
            addr: target.addr,
            handle,
            upload_timeout: DEFAULT_UPLOAD_TIMEOUT,
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(connect_err(format!(
            "no SSH login within {}",
            human(timeout)
        ))),
    }
}

/// Connects, retrying until `timeout` while the node is unreachable or presents a host key other
/// than the pinned one (sshd can answer before cloud-init installs klab's key). A refused login
/// or unusable key material fails at once. On timeout the last attempt's error is returned.
pub async fn wait_for_ssh(
    target: &SshTarget,
    timeout: Duration,
    mut on_event: impl FnMut(SshWaitEvent),
) -> Result<SshSession, RemoteError> {
    let start = Instant::now();
    let deadline = deadline_after(start, timeout);
    let mut delay = BACKOFF_START;
    let mut attempt: u32 = 0;
    let mut previous: Option<RemoteError> = None;
    loop {
        attempt += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt_timeout = remaining.min(ATTEMPT_CAP);
        let err = match connect(target, attempt_timeout).await {
            Ok(session) => {
                on_event(SshWaitEvent::Connected {
                    attempts: attempt,
                    elapsed: start.elapsed(),
                });
                return Ok(session);
            }
            Err(e) => e,
        };
        let reason = match &err {
            RemoteError::Auth { .. } | RemoteError::InvalidKey { .. } => return Err(err),
            RemoteError::HostKeyMismatch { .. } => RetryReason::HostKeyMismatch,
            RemoteError::Connect { .. } => RetryReason::Unreachable,
            _ => RetryReason::Other,
        };
        let now = Instant::now();
        if now >= deadline {
            // An attempt the deadline cut short says less than the complete one before it.
            let cut_short = attempt_timeout < ATTEMPT_CAP
                && matches!(err, RemoteError::Connect { ref message, .. } if message.starts_with("no SSH login within"));
            return Err(match previous {
                Some(prev) if cut_short => prev,
                _ => err,
            });
        }
        let sleep = delay.min(deadline - now);
        tracing::debug!(node = %target.node, attempt, "ssh not ready: {err}");
        on_event(SshWaitEvent::Retrying {
            attempt,
            reason,
            error: err.to_string(),
            delay: sleep,
        });
        tokio::time::sleep(sleep).await;
        delay = (delay * 2).min(BACKOFF_MAX);
        if Instant::now() >= deadline {
            return Err(err);
        }
        previous = Some(err);
    }
}

/// `start + timeout`, or a day past `start` when that overflows: a timeout of
/// 9223372036854775807 s must mean "a very long time", not a panic.
fn deadline_after(start: Instant, timeout: Duration) -> Instant {
    start
        .checked_add(timeout)
        .or_else(|| start.checked_add(Duration::from_secs(86_400 * 365)))
        .unwrap_or(start)
}

fn protocol(node: &str, e: &russh::Error) -> RemoteError {
    RemoteError::Protocol {
        node: node.to_string(),
        message: e.to_string(),
    }
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The shell command behind [`SshSession::upload`]: the mode is set on an empty file before any
/// data lands, so a secret is never readable under a looser mode, not even briefly.
pub fn upload_command(path: &str, mode: u32) -> String {
    let p = shell_quote(path);
    format!("umask 077 && : > {p} && chmod {mode:04o} {p} && cat > {p}")
}

impl SshSession {
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bound for each [`Remote::upload`] (default [`DEFAULT_UPLOAD_TIMEOUT`]).
    pub fn with_upload_timeout(mut self, timeout: Duration) -> Self {
        self.upload_timeout = timeout;
        self
    }

    /// False once the connection is gone (server closed it, keepalives unanswered).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// See [`Remote::exec_checked`].
    pub async fn exec_checked(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<String, RemoteError> {
        Remote::exec_checked(self, command, timeout).await
    }

    /// Says goodbye to the server; errors are irrelevant at this point and ignored.
    pub async fn close(self) {
        let bye = self.handle.disconnect(Disconnect::ByApplication, "", "en");
        if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, bye).await {
            tracing::debug!(node = %self.node, "ssh disconnect: {e}");
        }
    }

    async fn run(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<CommandOutput, RemoteError> {
        let deadline = deadline_after(Instant::now(), timeout);
        let timed_out = || RemoteError::Timeout {
            node: self.node.clone(),
            command: command.to_string(),
            after: timeout,
        };
        let proto = |e: russh::Error| RemoteError::Protocol {
            node: self.node.clone(),
            message: format!("`{command}`: {e}"),
        };
        let open = async {
            let channel = self.handle.channel_open_session().await?;
            channel.exec(true, command).await?;
            Ok::<_, russh::Error>(channel)
        };
        let channel = match tokio::time::timeout_at(deadline, open).await {
            Ok(opened) => opened.map_err(proto)?,
            Err(_) => return Err(timed_out()),
        };
        let (mut reader, writer) = channel.split();

        // Stdin is written while output is read: a command that echoes a large input would
        // otherwise fill the channel's buffers and stall both directions.
        let write = async {
            if let Some(data) = stdin
                && !data.is_empty()
            {
                writer.data_bytes(data.to_vec()).await?;
            }
            // Always EOF, so a command that reads stdin does not wait for input that never comes.
            writer.eof().await
        };
        let read = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let mut status = None;
            let mut signal = None;
            let mut refused = false;
            while let Some(msg) = reader.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => err.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::ExitSignal {
                        signal_name,
                        core_dumped,
                        error_message,
                        ..
                    } => {
                        signal = Some(format!(
                            "killed by signal {signal_name:?}{}{}",
                            if core_dumped { " (core dumped)" } else { "" },
                            if error_message.is_empty() {
                                String::new()
                            } else {
                                format!(": {error_message}")
                            }
                        ));
                    }
                    ChannelMsg::Failure => refused = true,
                    _ => {}
                }
            }
            (out, err, status, signal, refused)
        };
        let finished = tokio::time::timeout_at(deadline, async { tokio::join!(write, read) }).await;
        let Ok((written, (out, err, status, signal, refused))) = finished else {
            // Best effort: sshd (OpenSSH >= 7.9) delivers the signal; closing the channel at least
            // closes the command's pipes. Either way the caller is not kept waiting.
            // Sent in the background so the caller gets its error exactly at the deadline.
            tokio::spawn(async move {
                let stop = async {
                    let _ = writer.signal(Sig::KILL).await;
                    let _ = writer.close().await;
                };
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, stop).await;
            });
            return Err(timed_out());
        };
        let stdout = String::from_utf8_lossy(&out).into_owned();
        let mut stderr = String::from_utf8_lossy(&err).into_owned();
        match (status, signal) {
            (Some(exit_status), _) => Ok(CommandOutput {
                exit_status,
                stdout,
                stderr,
            }),
            // Like OpenSSH's client: a command killed by a signal reports 255.
            (None, Some(why)) => {
                if !stderr.is_empty() && !stderr.ends_with('\n') {
                    stderr.push('\n');
                }
                stderr.push_str(&format!("klab: remote command {why}\n"));
                Ok(CommandOutput {
                    exit_status: 255,
                    stdout,
                    stderr,
                })
            }
            (None, None) => Err(RemoteError::Protocol {
                node: self.node.clone(),
                message: if refused {
                    format!("the server refused to run `{command}`")
                } else if let Err(e) = written {
                    format!("`{command}`: the channel closed while sending input: {e}")
                } else {
                    format!("`{command}`: the channel closed without an exit status")
                },
            }),
        }
    }
}

/// The debug line for one command. Never the command itself: once its `${klab:…}` markers are
/// filled in it may hold the bootstrap token, the certificate key or a kubeconfig (`klab -vv` would
/// print them). The runner logs the op's label and the use case the redacted command instead.
fn exec_log_line(command: &str, stdin: Option<&[u8]>) -> String {
    match stdin {
        Some(data) => format!(
            "exec: a command of {} bytes, {} bytes on stdin",
            command.len(),
            data.len()
        ),
        None => format!("exec: a command of {} bytes", command.len()),
    }
}

impl Remote for SshSession {
    fn node(&self) -> &str {
        &self.node
    }

    async fn exec(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<CommandOutput, RemoteError> {
        tracing::debug!(node = %self.node, "{}", exec_log_line(command, stdin));
        self.run(command, stdin, timeout).await
    }

    async fn upload(&self, path: &str, data: &[u8], mode: u32) -> Result<(), RemoteError> {
        let command = upload_command(path, mode);
        let out = self.exec(&command, Some(data), self.upload_timeout).await?;
        if out.success() {
            Ok(())
        } else {
            Err(RemoteError::Failed {
                node: self.node.clone(),
                command: format!("upload {path}"),
                status: out.exit_status,
                stderr: super::stderr_tail(&out.stderr),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(private: &str, host_public: &str) -> SshTarget {
        SshTarget {
            node: "cp1".into(),
            addr: "127.0.0.1:22".parse().unwrap(),
            user: "klab".into(),
            user_private_key: private.into(),
            host_public_key: host_public.into(),
        }
    }

    #[test]
    fn debug_never_prints_the_private_key() {
        let (private, public) = keys::generate_ed25519("x").unwrap();
        let shown = format!("{:?}", target(&private, &public));
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("OPENSSH PRIVATE KEY"));
        let body = private.lines().nth(1).unwrap();
        assert!(!shown.contains(body));
        assert!(shown.contains("cp1"));
    }

    #[test]
    fn upload_command_sets_mode_before_writing() {
        let cmd = upload_command("/etc/klab/my file", 0o600);
        assert_eq!(
            cmd,
            "umask 077 && : > '/etc/klab/my file' && chmod 0600 '/etc/klab/my file' && cat > '/etc/klab/my file'"
        );
        assert!(upload_command("/x", 0o755).contains("chmod 0755 /x"));
    }

    #[tokio::test]
    async fn bad_key_material_fails_before_any_network_traffic() {
        let (private, public) = keys::generate_ed25519("x").unwrap();
        let err = connect(&target(&private, "nonsense"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RemoteError::InvalidKey { what, .. } if what == "pinned host key"),
            "{err}"
        );
        let err = wait_for_ssh(
            &target("not a key", &public),
            Duration::from_secs(5),
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, RemoteError::InvalidKey { what, .. } if what == "user private key"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_huge_timeout_does_not_overflow_the_deadline() {
        let (_, public) = keys::generate_ed25519("x").unwrap();
        let huge = Duration::from_secs(i64::MAX as u64);
        let err = wait_for_ssh(&target("not a key", &public), huge, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, RemoteError::InvalidKey { .. }), "{err}");
        assert!(deadline_after(Instant::now(), Duration::MAX) > Instant::now());
    }

    #[test]
    fn the_exec_debug_line_never_holds_the_command() {
        let token = "abcdef.0123456789abcdef";
        let command = format!(
            "sudo -n sh -c 't={token}\nkubeadm token list | grep -qx \"$t\" || kubeadm token create \"$t\"'"
        );
        let line = exec_log_line(&command, None);
        assert!(!line.contains(token), "{line}");
        assert!(!line.contains("kubeadm"), "{line}");
        assert_eq!(line, format!("exec: a command of {} bytes", command.len()));
        let with_input = exec_log_line(&command, Some(token.as_bytes()));
        assert!(!with_input.contains(token), "{with_input}");
        assert!(with_input.ends_with(", 23 bytes on stdin"), "{with_input}");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(2)), "2s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
    }
}
