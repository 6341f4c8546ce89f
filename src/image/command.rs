//! Subprocesses with a time bound, for the image build: no debootstrap, chroot or qemu-img can hang
//! klab for good. Output goes to an unlinked file rather than a pipe (a straggling grandchild holding
//! a pipe open would block the reader), and when the bound passes the whole process tree is killed.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Seek};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) enum RunError {
    Spawn(io::Error),
    /// The bound passed; the process tree was killed.
    TimedOut,
    Io(io::Error),
}

#[derive(Debug)]
pub(super) struct Finished {
    pub status: ExitStatus,
    /// stdout and stderr, interleaved as written.
    pub output: String,
}

/// An unlinked temporary file: gone from the directory as soon as it is open.
fn scratch_file() -> io::Result<fs::File> {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        ".klab-cmd-{}-{}.log",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    fs::remove_file(&path)?;
    Ok(file)
}

/// Runs `cmd` with stdin closed, waiting at most `bound` for it to exit.
pub(super) fn run_bounded(cmd: &mut Command, bound: Duration) -> Result<Finished, RunError> {
    let mut log = scratch_file().map_err(RunError::Io)?;
    let out = log.try_clone().map_err(RunError::Io)?;
    let err = log.try_clone().map_err(RunError::Io)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(RunError::Spawn)?;
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(RunError::Io)? {
            break status;
        }
        let elapsed = started.elapsed();
        if elapsed >= bound {
            kill_tree(child.id());
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunError::TimedOut);
        }
        std::thread::sleep(pause.min(bound - elapsed));
        pause = (pause * 2).min(Duration::from_millis(200));
    };
    let mut output = Vec::new();
    log.rewind().map_err(RunError::Io)?;
    log.read_to_end(&mut output).map_err(RunError::Io)?;
    Ok(Finished {
        status,
        output: String::from_utf8_lossy(&output).into_owned(),
    })
}

/// Parent pid of every process, from /proc/<pid>/stat (the field after the parenthesised name).
fn parents() -> HashMap<u32, u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            Some((pid, parse_ppid(&stat)?))
        })
        .collect()
}

fn parse_ppid(stat: &str) -> Option<u32> {
    // `pid (comm) state ppid …`; comm may itself contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every descendant of `root` (not `root` itself).
fn descendants(root: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, &parent) in parents {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// SIGKILLs the descendants of `pid` while it still lives, so none is re-parented out of reach.
/// A few rounds catch processes forked while the previous round ran.
fn kill_tree(pid: u32) {
    for _ in 0..3 {
        let pids = descendants(pid, &parents());
        if pids.is_empty() {
            return;
        }
        // std can signal only its own children; `kill` (procps) reaches the grandchildren.
        let killed = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .args(pids.iter().map(u32::to_string))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Err(e) = killed {
            tracing::warn!("cannot run `kill` for processes {pids:?} (install procps): {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_are_kept() {
        let done = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(done.status.code(), Some(3));
        assert_eq!(done.output, "out\nerr\n");
    }

    #[test]
    fn a_command_past_its_bound_is_killed_with_its_children() {
        let value = format!("run-{}", std::process::id());
        let marker = format!("KLAB_BOUND_TEST={value}");
        let started = Instant::now();
        // sh forks a `sleep` that would outlive a kill of sh alone; both inherit the marker.
        let err = run_bounded(
            Command::new("sh")
                .args(["-c", "sleep 30; true"])
                .env("KLAB_BOUND_TEST", &value),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, RunError::TimedOut), "{err:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let survivors = || -> Vec<u32> {
            parents()
                .keys()
                .copied()
                .filter(|pid| {
                    fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
                })
                .collect()
        };
        // SIGKILL is delivered asynchronously; give the kernel a moment to reap.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !survivors().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(survivors(), Vec::<u32>::new(), "the forked sleep survived");
    }

    #[test]
    fn ppid_is_read_after_the_command_name() {
        assert_eq!(parse_ppid("42 (a) b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parse_ppid("1 (init) S 0 1 1"), Some(0));
        let parents = HashMap::from([(2, 1), (3, 2), (4, 1), (5, 9)]);
        let mut d = descendants(1, &parents);
        d.sort();
        assert_eq!(d, [2, 3, 4]);
    }
}
