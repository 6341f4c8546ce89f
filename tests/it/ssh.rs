//! The russh client against an in-process russh server on 127.0.0.1: pinned host keys, retries,
//! exec (status, stdout, stderr, stdin, signals, timeouts), uploads and login failures.
//!
//! The fake sshd knows a few commands by name (`echo hi`, `false`, `warn`, `late-status`, `kill`,
//! `no-status`, `sleep`, `cat`); anything else runs through the real `sh -c` once stdin is complete,
//! so uploads exercise the actual shell command klab sends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klab::keys;
use klab::provision::ssh::{
    RetryReason, SshSession, SshTarget, SshWaitEvent, connect, wait_for_ssh,
};
use klab::provision::{Remote, RemoteError};
use russh::keys::PublicKey;
use russh::server::{self, Auth, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, Sig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const USER: &str = "klab";
const T: Duration = Duration::from_secs(10);

/// Keys for one test: the server's host key and the client's user key.
struct Keys {
    host_private: String,
    host_public: String,
    user_private: String,
    user_public: String,
}

fn keys() -> Keys {
    let (host_private, host_public) = keys::generate_ed25519("root@cp1").unwrap();
    let (user_private, user_public) = keys::generate_ed25519("klab@host").unwrap();
    Keys {
        host_private,
        host_public,
        user_private,
        user_public,
    }
}

fn target(addr: SocketAddr, k: &Keys) -> SshTarget {
    SshTarget {
        node: "cp1".into(),
        addr,
        user: USER.into(),
        user_private_key: k.user_private.clone(),
        host_public_key: k.host_public.clone(),
    }
}

/// A running fake sshd; aborted on drop.
struct FakeSshd {
    addr: SocketAddr,
    commands: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeSshd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSshd {
    async fn start(k: &Keys) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, k)
    }

    fn serve(listener: TcpListener, k: &Keys) -> Self {
        let addr = listener.local_addr().unwrap();
        let config = Arc::new(server::Config {
            keys: vec![keys::parse_private(&k.host_private).unwrap()],
            auth_rejection_time: Duration::from_millis(10),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        let authorized = keys::parse_public(&k.user_public).unwrap();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let log = commands.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let handler = Conn {
                    authorized: authorized.clone(),
                    commands: log.clone(),
                    channels: HashMap::new(),
                };
                let config = config.clone();
                tokio::spawn(async move {
                    if let Ok(running) = server::run_stream(config, socket, handler).await {
                        let _ = running.await;
                    }
                });
            }
        });
        FakeSshd {
            addr,
            commands,
            task,
        }
    }

    fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct Chan {
    _channel: Option<Channel<Msg>>,
    command: Option<String>,
    stdin: Vec<u8>,
}

struct Conn {
    authorized: PublicKey,
    commands: Arc<Mutex<Vec<String>>>,
    channels: HashMap<ChannelId, Chan>,
}

fn finish(session: &mut Session, ch: ChannelId, status: u32) -> Result<(), russh::Error> {
    session.exit_status_request(ch, status)?;
    session.eof(ch)?;
    session.close(ch)
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if user == USER && key.public_key.key_data() == self.authorized.key_data() {
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(
            channel.id(),
            Chan {
                _channel: Some(channel),
                ..Default::default()
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.commands.lock().unwrap().push(command.clone());
        session.channel_success(ch)?;
        match command.as_str() {
            "echo hi" => {
                session.data(ch, &b"hi\n"[..])?;
                finish(session, ch, 0)?;
            }
            "false" => finish(session, ch, 1)?,
            "warn" => {
                session.data(ch, &b"out\n"[..])?;
                session.extended_data(ch, 1, &b"oops\n"[..])?;
                finish(session, ch, 3)?;
            }
            // Exit status after EOF, which real sshd does too.
            "late-status" => {
                session.data(ch, &b"data\n"[..])?;
                session.eof(ch)?;
                session.exit_status_request(ch, 7)?;
                session.close(ch)?;
            }
            "kill" => {
                session.exit_signal_request(ch, Sig::TERM, false, "terminated", "en")?;
                session.eof(ch)?;
                session.close(ch)?;
            }
            "no-status" => {
                session.eof(ch)?;
                session.close(ch)?;
            }
            "sleep" => {
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.command = Some(command);
                }
            }
            // `cat` and shell commands run when stdin is complete.
            _ => {
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.command = Some(command);
                }
            }
        }
        Ok(())
    }

    async fn data(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.get_mut(&ch) {
            c.stdin.extend_from_slice(data);
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        ch: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = self.channels.get(&ch).and_then(|c| c.command.clone());
        let what = format!("!signal {signal:?} {}", command.unwrap_or_default());
        self.commands.lock().unwrap().push(what);
        Ok(())
    }

    async fn channel_close(
        &mut self,
        ch: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.remove(&ch) {
            let what = format!("!close {}", c.command.unwrap_or_default());
            self.commands.lock().unwrap().push(what);
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        ch: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(c) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let Some(command) = c.command.take() else {
            return Ok(());
        };
        if command == "sleep" {
            c.command = Some(command);
            return Ok(());
        }
        let stdin = std::mem::take(&mut c.stdin);
        if command == "cat" {
            session.data(ch, stdin)?;
            return finish(session, ch, 0);
        }
        let out = run_shell(&command, &stdin).await;
        session.data(ch, out.stdout)?;
        if !out.stderr.is_empty() {
            session.extended_data(ch, 1, out.stderr)?;
        }
        finish(session, ch, out.status.code().unwrap_or(255) as u32)
    }
}

async fn run_shell(command: &str, stdin: &[u8]) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    // A command that exits without reading its input closes the pipe; that is not an error.
    let _ = pipe.write_all(stdin).await;
    drop(pipe);
    child.wait_with_output().await.unwrap()
}

async fn login(sshd: &FakeSshd, k: &Keys) -> SshSession {
    connect(&target(sshd.addr, k), T).await.unwrap()
}

/// A port nothing listens on (bound, then released).
async fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn pinned_key_logs_in_even_with_another_comment() {
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    // The pinned line carries a different comment than the server's key: must still match.
    let mut t = target(sshd.addr, &k);
    let bare: Vec<&str> = k.host_public.split_whitespace().take(2).collect();
    t.host_public_key = format!("{} {} someone-else", bare[0], bare[1]);
    let mut events = Vec::new();
    let s = wait_for_ssh(&t, T, |e| events.push(e)).await.unwrap();
    assert_eq!(s.node(), "cp1");
    assert_eq!(s.addr(), sshd.addr);
    assert!(matches!(
        events.as_slice(),
        [SshWaitEvent::Connected { attempts: 1, .. }]
    ));
    let out = s.exec("echo hi", None, T).await.unwrap();
    assert_eq!((out.exit_status, out.stdout.as_str()), (0, "hi\n"));
    s.close().await;
}

#[tokio::test]
async fn wrong_host_key_is_refused_after_the_deadline_with_both_fingerprints() {
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    let (_, pinned) = keys::generate_ed25519("root@cp1").unwrap();
    let mut t = target(sshd.addr, &k);
    t.host_public_key = pinned.clone();
    let mut events = Vec::new();
    let started = Instant::now();
    let err = wait_for_ssh(&t, Duration::from_secs(2), |e| events.push(e))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "gave up early: {took:?}");
    assert!(
        took < Duration::from_millis(2900),
        "overran the deadline: {took:?}"
    );
    let expected = keys::fingerprint(&pinned).unwrap();
    let presented = keys::fingerprint(&k.host_public).unwrap();
    match &err {
        RemoteError::HostKeyMismatch {
            node,
            expected: e,
            presented: p,
        } => {
            assert_eq!(node, "cp1");
            assert_eq!(e, &expected);
            assert_eq!(p, &presented);
        }
        other => panic!("expected a host key mismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(
            "the node presented a host key klab did not generate for it; refusing to log in"
        ),
        "{msg}"
    );
    assert!(msg.contains(&expected) && msg.contains(&presented), "{msg}");
    // It retried, and said why.
    assert!(events.len() >= 2, "{events:?}");
    assert!(events.iter().all(|e| matches!(
        e,
        SshWaitEvent::Retrying {
            reason: RetryReason::HostKeyMismatch,
            ..
        }
    )));
    // Never logged in: no command reached the server.
    assert!(sshd.commands().is_empty());
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_naming_the_address() {
    let k = keys();
    let addr = free_port().await;
    let err = connect(&target(addr, &k), T).await.unwrap_err();
    assert!(matches!(err, RemoteError::Connect { .. }), "{err:?}");

    let started = Instant::now();
    let err = wait_for_ssh(&target(addr, &k), Duration::from_millis(1200), |_| {})
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let msg = err.to_string();
    match &err {
        RemoteError::Connect {
            node,
            addr: a,
            message,
        } => {
            assert_eq!(node, "cp1");
            assert_eq!(a, &addr.to_string());
            assert!(message.to_lowercase().contains("refused"), "{msg}");
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert!(msg.contains(&addr.to_string()), "{msg}");
}

#[tokio::test]
async fn server_that_appears_later_is_waited_for() {
    let k = keys();
    let addr = free_port().await;
    let host_private = k.host_private.clone();
    let host_public = k.host_public.clone();
    let user_public = k.user_public.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let listener = TcpListener::bind(addr).await.unwrap();
        let k = Keys {
            host_private,
            host_public,
            user_private: String::new(),
            user_public,
        };
        FakeSshd::serve(listener, &k)
    });
    let mut events = Vec::new();
    let started = Instant::now();
    let s = wait_for_ssh(&target(addr, &k), T, |e| events.push(e))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(4), "backoff too slow: {took:?}");
    assert!(events.iter().any(|e| matches!(
        e,
        SshWaitEvent::Retrying {
            reason: RetryReason::Unreachable,
            ..
        }
    )));
    match events.last() {
        Some(SshWaitEvent::Connected { attempts, .. }) => assert!(*attempts >= 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.exec("echo hi", None, T).await.unwrap().stdout, "hi\n");
    let _sshd = late.await.unwrap();
}

#[tokio::test]
async fn wrong_user_key_is_an_auth_error_without_retrying() {
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    let (other_private, _) = keys::generate_ed25519("intruder").unwrap();
    let mut t = target(sshd.addr, &k);
    t.user_private_key = other_private;
    let started = Instant::now();
    let err = wait_for_ssh(&t, T, |_| {}).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    match &err {
        RemoteError::Auth { node, user } => {
            assert_eq!((node.as_str(), user.as_str()), ("cp1", USER))
        }
        other => panic!("expected an auth error, got {other:?}"),
    }
    // The right key but another user is refused too.
    let mut t = target(sshd.addr, &k);
    t.user = "root".into();
    assert!(matches!(
        connect(&t, T).await,
        Err(RemoteError::Auth { user, .. }) if user == "root"
    ));
}

#[tokio::test]
async fn exec_reports_status_stdout_and_stderr() {
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    let s = login(&sshd, &k).await;

    let out = s.exec("false", None, T).await.unwrap();
    assert_eq!(out.exit_status, 1);
    assert!(!out.success());

    let out = s.exec("warn", None, T).await.unwrap();
    assert_eq!(
        (out.exit_status, out.stdout.as_str(), out.stderr.as_str()),
        (3, "out\n", "oops\n")
    );

    let out = s.exec("late-status", None, T).await.unwrap();
    assert_eq!((out.exit_status, out.stdout.as_str()), (7, "data\n"));

    let out = s.exec("kill", None, T).await.unwrap();
    assert_eq!(out.exit_status, 255);
    assert!(
        out.stderr.contains("killed by signal TERM: terminated"),
        "{}",
        out.stderr
    );

    let err = s.exec("no-status", None, T).await.unwrap_err();
    assert!(matches!(err, RemoteError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("without an exit status"), "{err}");

    // Through the real shell.
    let out = s
        .exec("printf 'a\\nb'; echo err >&2; exit 4", None, T)
        .await
        .unwrap();
    assert_eq!(
        (out.exit_status, out.stdout.as_str(), out.stderr.as_str()),
        (4, "a\nb", "err\n")
    );
    s.close().await;
}

#[tokio::test]
async fn exec_checked_returns_stdout_or_a_failure_with_stderr() {
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    let s = login(&sshd, &k).await;
    assert_eq!(s.exec_checked("echo hi", T).await.unwrap(), "hi\n");
    let err = s.exec_checked("warn", T).await.unwrap_err();
    match &err {
        RemoteError::Failed {
            node,
            command,
            status,
            stderr,
        } => {
            assert_eq!(
                (node.as_str(), command.as_str(), *status),
                ("cp1", "warn", 3)
            );
            assert_eq!(stderr, "oops");
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("`warn`") && msg.contains("exit status 3") && msg.contains("oops"),
        "{msg}"
    );
}

#[tokio::test]
async fn stdin_reaches_the_command_even_when_large() {
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    let s = login(&sshd, &k).await;
    let out = s.exec("cat", Some(b"hello\n"), T).await.unwrap();
    assert_eq!(out.stdout, "hello\n");
    // Without stdin the command still gets EOF instead of hanging.
    let out = s.exec("cat", None, T).await.unwrap();
    assert_eq!((out.exit_status, out.stdout.as_str()), (0, ""));
    // Bigger than the channel window, echoed back: needs reading while writing.
    let big: String = (0..40_000).map(|i| format!("{i:07}\n")).collect();
    let out = s.exec("cat", Some(big.as_bytes()), T).await.unwrap();
    assert_eq!(out.stdout.len(), big.len());
    assert!(out.stdout == big);
}

#[tokio::test]
async fn upload_writes_content_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    let s = login(&sshd, &k).await;
    let dir = tempfile::tempdir().unwrap();

    let secret = dir.path().join("admin conf's.yaml");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    s.upload(secret.to_str().unwrap(), &data, 0o600)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), data);
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Overwrite an existing file with a wider mode and shorter content.
    s.upload(secret.to_str().unwrap(), b"short\n", 0o644)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), b"short\n");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);

    let empty = dir.path().join("empty");
    s.upload(empty.to_str().unwrap(), b"", 0o640).await.unwrap();
    assert_eq!(std::fs::read(&empty).unwrap(), b"");

    let missing = dir.path().join("no/such/dir/file");
    let err = s
        .upload(missing.to_str().unwrap(), b"x", 0o644)
        .await
        .unwrap_err();
    match &err {
        RemoteError::Failed {
            command,
            status,
            stderr,
            ..
        } => {
            assert!(command.contains("no/such/dir/file"), "{command}");
            assert_ne!(*status, 0);
            assert!(!stderr.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(sshd.commands().iter().any(|c| c.contains("chmod 0600")));
}

#[tokio::test]
async fn per_command_timeout_and_the_session_survives_it() {
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    let s = login(&sshd, &k).await;
    let started = Instant::now();
    let err = s
        .exec("sleep", None, Duration::from_millis(300))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(1),
        "{took:?}"
    );
    match &err {
        RemoteError::Timeout {
            node,
            command,
            after,
        } => {
            assert_eq!((node.as_str(), command.as_str()), ("cp1", "sleep"));
            assert_eq!(*after, Duration::from_millis(300));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.exec("echo hi", None, T).await.unwrap().stdout, "hi\n");
    // The abandoned command was told to stop and its channel closed.
    let stopped = async {
        loop {
            let log = sshd.commands();
            if log.contains(&"!signal KILL sleep".to_string())
                && log.contains(&"!close sleep".to_string())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), stopped)
        .await
        .unwrap_or_else(|_| panic!("no signal/close seen: {:?}", sshd.commands()));
}

#[tokio::test]
async fn one_session_serves_concurrent_commands() {
    let k = keys();
    let sshd = FakeSshd::start(&k).await;
    let s = Arc::new(login(&sshd, &k).await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = format!("echo task-{i}; exit {i}");
            s.exec(&cmd, None, T).await.unwrap()
        }));
    }
    // A command that never answers does not hold up the others.
    let stuck = {
        let s = s.clone();
        tokio::spawn(async move { s.exec("sleep", None, Duration::from_secs(2)).await })
    };
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap();
        assert_eq!(out.exit_status, i as u32);
        assert_eq!(out.stdout, format!("task-{i}\n"));
    }
    assert!(matches!(
        stuck.await.unwrap(),
        Err(RemoteError::Timeout { .. })
    ));
    assert!(!s.is_closed());
}
