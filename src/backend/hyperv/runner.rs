//! Running PowerShell: the [`PsRunner`] seam, the real `powershell.exe` runner (Windows, or WSL2
//! through the Windows interop) and a [`ReplayRunner`] for tests that answers with recorded outputs
//! and fails on any script it did not expect.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::ps::{self, Invocation, PsScript};

/// What a script printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsOutput {
    pub stdout: String,
    pub stderr: String,
    /// `None` when killed.
    pub code: Option<i32>,
}

impl PsOutput {
    pub fn ok(stdout: impl Into<String>) -> Self {
        Self {
            stdout: stdout.into(),
            stderr: String::new(),
            code: Some(0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {program}: {message}")]
    Spawn { program: String, message: String },
    #[error("`{key}` did not finish within {after:?} and was killed")]
    Timeout { key: String, after: Duration },
    #[error("{0}")]
    Io(String),
    #[error("replay: {0}")]
    Replay(String),
}

/// Run one script (bounded by `timeout`) and place files on the Windows host.
pub trait PsRunner: Send + Sync + 'static {
    fn run(&self, script: &PsScript, timeout: Duration) -> Result<PsOutput, RunError>;
    /// Write `data` to `windows_path` on the Hyper-V host (the seed ISO).
    fn write_file(&self, windows_path: &str, data: &[u8]) -> Result<(), RunError>;
    /// Where it runs, for messages (`powershell.exe on Windows`, `… from WSL2`, `replay`).
    fn describe(&self) -> String;
}

/// Where klab runs relative to Windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Windows,
    Wsl2,
    /// Plain Linux: no Hyper-V reachable.
    Other,
}

/// WSL2 kernels say so in `/proc/sys/kernel/osrelease` (`5.15.153.1-microsoft-standard-WSL2`).
pub fn is_wsl_osrelease(osrelease: &str) -> bool {
    let l = osrelease.to_ascii_lowercase();
    l.contains("microsoft") || l.contains("wsl")
}

pub fn detect_host() -> Host {
    if cfg!(windows) {
        return Host::Windows;
    }
    match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(s) if is_wsl_osrelease(&s) => Host::Wsl2,
        _ => Host::Other,
    }
}

/// `powershell.exe` as WSL2 sees it; Windows finds it on PATH.
pub const WSL_POWERSHELL: &str = "/mnt/c/Windows/System32/WindowsPowerShell/v1.0/powershell.exe";

/// The real runner.
#[derive(Debug, Clone)]
pub struct PowerShellRunner {
    pub host: Host,
    pub program: PathBuf,
    /// Scratch directory for `-File` scripts (a Linux path under WSL2, converted with `wslpath -w`).
    pub scratch: PathBuf,
}

impl PowerShellRunner {
    pub fn detect(scratch: PathBuf) -> Option<Self> {
        let host = detect_host();
        let program = match host {
            Host::Windows => PathBuf::from("powershell.exe"),
            Host::Wsl2 => PathBuf::from(WSL_POWERSHELL),
            Host::Other => return None,
        };
        Some(Self {
            host,
            program,
            scratch,
        })
    }

    /// `wslpath -w|-u PATH` under WSL2; the path itself on Windows.
    fn wslpath(&self, flag: &str, path: &str) -> Result<String, RunError> {
        if self.host != Host::Wsl2 {
            return Ok(path.to_string());
        }
        let out = bounded(
            Command::new("wslpath").arg(flag).arg(path),
            Duration::from_secs(10),
            "wslpath",
        )?;
        if out.code != Some(0) {
            return Err(RunError::Io(format!(
                "wslpath {flag} {path}: {}",
                out.stderr.trim()
            )));
        }
        Ok(out.stdout.trim_end_matches(['\r', '\n']).to_string())
    }
}

impl PsRunner for PowerShellRunner {
    fn run(&self, script: &PsScript, timeout: Duration) -> Result<PsOutput, RunError> {
        let key = script.key();
        tracing::debug!(script = %key, "powershell");
        let mut cmd = Command::new(&self.program);
        cmd.args(ps::POWERSHELL_FLAGS);
        let mut file = None;
        match ps::invocation(&script.text) {
            Invocation::Encoded(e) => {
                cmd.arg("-EncodedCommand").arg(e);
            }
            Invocation::File => {
                std::fs::create_dir_all(&self.scratch)
                    .map_err(|e| RunError::Io(format!("{}: {e}", self.scratch.display())))?;
                let path =
                    self.scratch
                        .join(format!("klab-{}-{}.ps1", script.op, std::process::id()));
                std::fs::write(&path, ps::script_file_bytes(&script.text))
                    .map_err(|e| RunError::Io(format!("{}: {e}", path.display())))?;
                let win = self.wslpath("-w", &path.to_string_lossy())?;
                cmd.arg("-File").arg(win);
                file = Some(path);
            }
        }
        let out = bounded(&mut cmd, timeout, &key);
        if let Some(f) = file {
            let _ = std::fs::remove_file(f);
        }
        out
    }

    fn write_file(&self, windows_path: &str, data: &[u8]) -> Result<(), RunError> {
        let local = self.wslpath("-u", windows_path)?;
        let local = Path::new(&local);
        if let Some(dir) = local.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| RunError::Io(format!("{}: {e}", dir.display())))?;
        }
        std::fs::write(local, data).map_err(|e| RunError::Io(format!("{windows_path}: {e}")))
    }

    fn describe(&self) -> String {
        match self.host {
            Host::Wsl2 => format!("{} (from WSL2)", self.program.display()),
            _ => self.program.display().to_string(),
        }
    }
}

/// Run a command with piped output, killed after `timeout`. Pipes drain on threads so a chatty
/// child cannot block on a full pipe.
pub(crate) fn bounded(
    cmd: &mut Command,
    timeout: Duration,
    key: &str,
) -> Result<PsOutput, RunError> {
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RunError::Spawn {
            program,
            message: e.to_string(),
        })?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::Timeout {
                    key: key.to_string(),
                    after: timeout,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(RunError::Io(e.to_string())),
        }
    };
    Ok(PsOutput {
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        code: status.code(),
    })
}

/// One recorded answer: the script key (`op object`) it answers, and the output.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub key: String,
    pub output: PsOutput,
}

/// Test runner: answers scripts strictly in the recorded order; an unexpected script, or one out
/// of order, is an error (and is remembered, so a test can assert nothing unexpected ran).
#[derive(Debug, Default)]
pub struct ReplayRunner {
    inner: Mutex<ReplayState>,
}

#[derive(Debug, Default)]
struct ReplayState {
    queue: VecDeque<Recorded>,
    ran: Vec<PsScript>,
    files: Vec<(String, usize)>,
    unexpected: Vec<String>,
}

impl ReplayRunner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Expect `key` next, answered with `stdout` and exit status 0.
    pub fn expect(&self, key: &str, stdout: &str) -> &Self {
        self.expect_output(key, PsOutput::ok(stdout))
    }

    pub fn expect_output(&self, key: &str, output: PsOutput) -> &Self {
        self.state().queue.push_back(Recorded {
            key: key.to_string(),
            output,
        });
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every script that ran, in order.
    pub fn ran(&self) -> Vec<PsScript> {
        self.state().ran.clone()
    }
    pub fn ran_keys(&self) -> Vec<String> {
        self.state().ran.iter().map(PsScript::key).collect()
    }
    /// (Windows path, byte count) of every written file.
    pub fn files(&self) -> Vec<(String, usize)> {
        self.state().files.clone()
    }
    /// Keys still expected (a test ends with this empty).
    pub fn pending(&self) -> Vec<String> {
        self.state().queue.iter().map(|r| r.key.clone()).collect()
    }
    pub fn unexpected(&self) -> Vec<String> {
        self.state().unexpected.clone()
    }
}

impl PsRunner for ReplayRunner {
    fn run(&self, script: &PsScript, _timeout: Duration) -> Result<PsOutput, RunError> {
        let key = script.key();
        let mut st = self.state();
        match st.queue.front() {
            Some(r) if r.key == key => {
                let r = st.queue.pop_front().map(|r| r.output);
                st.ran.push(script.clone());
                r.ok_or_else(|| RunError::Replay("queue emptied".into()))
            }
            next => {
                let msg = match next {
                    Some(r) => format!("unexpected script `{key}` (expected `{}`)", r.key),
                    None => format!("unexpected script `{key}` (nothing more was expected)"),
                };
                st.unexpected.push(key);
                Err(RunError::Replay(msg))
            }
        }
    }

    fn write_file(&self, windows_path: &str, data: &[u8]) -> Result<(), RunError> {
        self.state()
            .files
            .push((windows_path.to_string(), data.len()));
        Ok(())
    }

    fn describe(&self) -> String {
        "replay".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(op: &'static str, object: &str) -> PsScript {
        PsScript {
            op,
            object: object.into(),
            text: "Get-VM".into(),
        }
    }

    #[test]
    fn wsl_detection() {
        assert!(is_wsl_osrelease("5.15.153.1-microsoft-standard-WSL2\n"));
        assert!(is_wsl_osrelease("4.4.0-19041-Microsoft"));
        assert!(!is_wsl_osrelease("6.1.0-18-amd64"));
    }

    #[test]
    fn replay_answers_in_order_and_refuses_the_unexpected() {
        let r = ReplayRunner::new();
        r.expect("observe klab-a", "[1]")
            .expect("start-vm klab-a-n1", "[2]");
        let t = Duration::from_secs(1);
        assert_eq!(
            r.run(&script("observe", "klab-a"), t).unwrap().stdout,
            "[1]"
        );
        let e = r.run(&script("remove-vm", "klab-a-n1"), t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "replay: unexpected script `remove-vm klab-a-n1` (expected `start-vm klab-a-n1`)"
        );
        assert_eq!(
            r.run(&script("start-vm", "klab-a-n1"), t).unwrap().stdout,
            "[2]"
        );
        let e = r.run(&script("observe", "klab-a"), t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "replay: unexpected script `observe klab-a` (nothing more was expected)"
        );
        assert_eq!(r.unexpected(), ["remove-vm klab-a-n1", "observe klab-a"]);
        assert_eq!(r.ran_keys(), ["observe klab-a", "start-vm klab-a-n1"]);
        assert!(r.pending().is_empty());
    }

    #[test]
    fn bounded_kills_a_hanging_child() {
        let start = Instant::now();
        let e = bounded(
            Command::new("sleep").arg("30"),
            Duration::from_millis(200),
            "sleep",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`sleep` did not finish within 200ms and was killed"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn bounded_collects_output_and_status() {
        let out = bounded(
            Command::new("sh").args(["-c", "printf 'ok\\n'; printf 'warn' >&2; exit 3"]),
            Duration::from_secs(10),
            "sh",
        )
        .unwrap();
        assert_eq!(
            out,
            PsOutput {
                stdout: "ok\n".into(),
                stderr: "warn".into(),
                code: Some(3)
            }
        );
    }
}

/// `--dry-run`: records every script and answers as an empty Hyper-V host would (nothing exists,
/// rights fine), so the normal `up` flow runs unchanged and the caller prints [`DryRunRunner::scripts`].
#[derive(Debug, Default)]
pub struct DryRunRunner {
    ran: Mutex<Vec<PsScript>>,
}

impl DryRunRunner {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn scripts(&self) -> Vec<PsScript> {
        self.ran.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl PsRunner for DryRunRunner {
    fn run(&self, script: &PsScript, _timeout: Duration) -> Result<PsOutput, RunError> {
        self.ran
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(script.clone());
        let answer = match script.op {
            "observe" => r#"[{"VMs":[],"Switches":[],"Pools":[]}]"#,
            "get-network" => r#"[{"Switches":[],"Nats":[],"Addresses":[]}]"#,
            "preflight" => {
                r#"[{"User":"dry-run","Administrator":true,"HyperVAdministrators":true,"HyperVModule":true,"Vmms":"Running"}]"#
            }
            "wsl-forwarding" | "vm-state" => "[]",
            _ => "[{}]",
        };
        Ok(PsOutput::ok(answer))
    }

    fn write_file(&self, _windows_path: &str, _data: &[u8]) -> Result<(), RunError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "dry run (nothing is executed)".into()
    }
}
