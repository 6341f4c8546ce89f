//! The binary on a pseudo-terminal, as a user in a terminal runs it: results reach stdout whether
//! stdout is the terminal, a file or a pipe; progress and notes go to the terminal on stderr.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::pty::{Winsize, openpty};

/// What the terminal showed and how the program ended.
struct Run {
    terminal: String,
    status: ExitStatus,
}

/// Run klab with stderr (and stdout unless `stdout` is given) on a fresh pseudo-terminal.
fn on_pty(args: &[&str], data_dir: &Path, stdout: Option<Stdio>) -> Run {
    let size = Winsize {
        ws_row: 24,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(&size, None).expect("openpty");
    let mut child = {
        let out = match stdout {
            Some(s) => s,
            None => Stdio::from(pty.slave.try_clone().expect("dup pty")),
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_klab"));
        cmd.args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("KLAB_DATA_DIR", data_dir)
            .env("TERM", "xterm-256color")
            .env_remove("KLAB_CONNECT")
            .env_remove("KLAB_STATE_DIR")
            .env_remove("KLAB_ACCEL")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::from(pty.slave));
        // `cmd` (and with it this process's copies of the terminal's slave side) is dropped at
        // the end of the block, so the reader below sees the end once the child exits.
        cmd.spawn().expect("run klab")
    };
    let mut master = File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Linux reports the closed slave side as EIO, not as end of file.
        while let Ok(n) = master.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for klab") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("klab {args:?} did not finish within 60 s on a terminal");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let terminal = String::from_utf8_lossy(&reader.join().expect("pty reader")).into_owned();
    Run { terminal, status }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read output file")
}

#[test]
fn plan_redirected_to_a_file_writes_the_file_while_stderr_is_a_terminal() {
    let data = tempfile::tempdir().unwrap();
    let out_path = data.path().join("plan.txt");
    let out = File::create(&out_path).unwrap();
    let run = on_pty(
        &["plan", "labs/local.toml"],
        data.path(),
        Some(Stdio::from(out)),
    );
    assert!(run.status.success(), "{}", run.terminal);
    let plan = read(&out_path);
    assert!(
        plan.starts_with("lab local on qemu:///system (accelerator: qemu)\n"),
        "{plan}"
    );
    assert!(plan.contains("\n  node    node1 "), "{plan}");
    assert!(plan.ends_with('\n'));
    assert!(
        !run.terminal.contains("lab local on"),
        "the result leaked onto the terminal: {}",
        run.terminal
    );
}

#[test]
fn ssh_config_appended_to_a_file_lands_in_the_file() {
    let data = tempfile::tempdir().unwrap();
    let state = data.path().join("labs/demo");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("ssh_config"),
        "# klab lab demo\nHost demo-cp1 cp1\n  HostName 10.10.1.10\n",
    )
    .unwrap();
    let config = data.path().join("config");
    std::fs::write(&config, "Host old\n").unwrap();
    let out = std::fs::OpenOptions::new()
        .append(true)
        .open(&config)
        .unwrap();
    let run = on_pty(&["ssh-config", "demo"], data.path(), Some(Stdio::from(out)));
    assert!(run.status.success(), "{}", run.terminal);
    assert_eq!(
        read(&config),
        "Host old\n# klab lab demo\nHost demo-cp1 cp1\n  HostName 10.10.1.10\n"
    );
    assert!(!run.terminal.contains("HostName"), "{}", run.terminal);
}

#[test]
fn a_result_written_to_a_pipe_reaches_the_pipe() {
    let data = tempfile::tempdir().unwrap();
    let (mut rx, tx) = std::io::pipe().unwrap();
    let run = on_pty(
        &["validate", "labs/local.toml"],
        data.path(),
        Some(Stdio::from(tx)),
    );
    assert!(run.status.success(), "{}", run.terminal);
    let mut got = String::new();
    rx.read_to_string(&mut got).unwrap();
    assert_eq!(
        got,
        "labs/local.toml: lab `local` is valid (2 nodes, 2 networks)\n"
    );
    assert!(!run.terminal.contains("is valid"), "{}", run.terminal);
}

/// A built image already in the cache: `klab image build` then shows its spinner and prints its
/// result without running debootstrap.
fn cached_build(data: &Path) {
    let cache = klab::image::ImageCache::new(data.join("images"));
    std::fs::create_dir_all(cache.root()).unwrap();
    let key = "debian-12";
    std::fs::write(cache.base_path(key), b"QFI\xfb fake image").unwrap();
    std::fs::write(cache.kernel_path(key), b"kernel").unwrap();
    std::fs::write(cache.initrd_path(key), b"initrd").unwrap();
    let md = std::fs::metadata(cache.base_path(key)).unwrap();
    let mtime = md
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let meta = klab::image::ImageMeta {
        key: key.into(),
        source: klab::image::Origin::Built,
        url: None,
        checksum_kind: "sha256".into(),
        checksum: "ab".repeat(32),
        size: md.len(),
        mtime_secs: mtime.as_secs(),
        mtime_nanos: mtime.subsec_nanos(),
        kernel: Some(cache.kernel_path(key).display().to_string()),
        initrd: Some(cache.initrd_path(key).display().to_string()),
        cmdline: Some(klab::image::DEBIAN12_CMDLINE.into()),
        created_by: "klab test".into(),
        created_at: 0,
        build: None,
    };
    std::fs::write(
        cache.meta_path(key),
        serde_json::to_string_pretty(&meta).unwrap(),
    )
    .unwrap();
}

#[test]
fn progress_and_result_share_the_terminal_when_both_streams_are_on_it() {
    let data = tempfile::tempdir().unwrap();
    cached_build(data.path());
    let run = on_pty(&["image", "build", "debian-12"], data.path(), None);
    assert!(run.status.success(), "{}", run.terminal);
    // The spinner's last state and the result line, in that order.
    let done = run
        .terminal
        .find("image debian-12 built")
        .unwrap_or_else(|| panic!("no finished spinner on the terminal: {:?}", run.terminal));
    let result = run
        .terminal
        .find("kept ")
        .unwrap_or_else(|| panic!("no result on the terminal: {:?}", run.terminal));
    assert!(done < result, "{:?}", run.terminal);
    // The finished spinner is a line of its own, once; nothing is drawn after the result.
    assert_eq!(
        run.terminal.matches("image debian-12 built").count(),
        1,
        "{:?}",
        run.terminal
    );
    assert!(
        run.terminal
            .ends_with("now use this image (direct kernel boot, no download)\r\n"),
        "{:?}",
        run.terminal
    );
    assert!(
        run.terminal.contains("(0 MiB, sha256 abababababab, "),
        "{:?}",
        run.terminal
    );
}

#[test]
fn log_lines_are_written_above_the_bars_not_through_them() {
    let data = tempfile::tempdir().unwrap();
    cached_build(data.path());
    let run = on_pty(&["-v", "image", "build", "debian-12"], data.path(), None);
    assert!(run.status.success(), "{}", run.terminal);
    let at = run
        .terminal
        .find("image `debian-12`: already built at")
        .unwrap_or_else(|| panic!("no log line: {:?}", run.terminal));
    // The log line starts on a line of its own: the spinner was cleared (`ESC[2K`) first.
    let line_start = run.terminal[..at].rfind(['\n', '\r']).map_or(0, |i| i + 1);
    let head = &run.terminal[line_start..at];
    assert!(
        !head.contains("image debian-12 building"),
        "the log line was written into the spinner's line: {head:?}"
    );
    assert!(head.starts_with("\u{1b}[2K"), "{head:?}");
}

#[test]
fn with_stdout_redirected_the_spinner_stays_on_the_terminal() {
    let data = tempfile::tempdir().unwrap();
    cached_build(data.path());
    let out_path = data.path().join("out.txt");
    let out = File::create(&out_path).unwrap();
    let run = on_pty(
        &["image", "build", "debian-12"],
        data.path(),
        Some(Stdio::from(out)),
    );
    assert!(run.status.success(), "{}", run.terminal);
    let result = read(&out_path);
    let image = data.path().join("images/debian-12.qcow2");
    assert!(
        result.starts_with(&format!(
            "kept {} (0 MiB, sha256 abababababab, ",
            image.display()
        )),
        "{result}"
    );
    assert!(
        result.contains(
            "s); --force rebuilds it\nlabs with `image = \"debian-12\"` now use this image"
        ),
        "{result}"
    );
    assert!(
        run.terminal.contains("image debian-12 built"),
        "{:?}",
        run.terminal
    );
    assert!(!run.terminal.contains("kept "), "{:?}", run.terminal);
}
