//! The `klab` binary as a user meets it: exit statuses, where output goes, JSON for scripts.

use std::path::Path;
use std::process::{Command, Output};

fn klab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_klab"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // Keep any test away from the host's real state and images.
        .env(
            "KLAB_DATA_DIR",
            std::env::temp_dir().join("klab-cli-test-data"),
        )
        .env_remove("KLAB_CONNECT")
        .output()
        .expect("run klab")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn validate_exits_0_for_every_example_lab() {
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("labs")).unwrap() {
        let path = entry.unwrap().path();
        let out = klab(&["validate", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("is valid"));
    }
}

#[test]
fn an_invalid_lab_exits_1_with_the_exact_diagnostics_on_stderr() {
    let file = "tests/invalid/02-unknown-keys.toml";
    let out = klab(&["validate", file]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let expected = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid/02-unknown-keys.expected"),
    )
    .unwrap();
    assert_eq!(text(&out.stderr).trim_end(), expected.trim_end());
}

#[test]
fn a_missing_lab_file_is_a_user_error_with_a_hint() {
    let out = klab(&["validate", "no/such/lab.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("no/such/lab.toml"), "{err}");
    assert!(err.contains("hint: "), "{err}");
}

#[test]
fn plan_json_is_a_document_scripts_can_read() {
    let out = klab(&["plan", "labs/seed-001-ha.toml", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["lab"], "ha");
    assert_eq!(plan["nodes"].as_array().unwrap().len(), 7);
    assert_eq!(
        plan["kubernetes"]["control_plane_endpoint"],
        "192.168.3.10:6443"
    );
    // Byte-identical on every run.
    let again = klab(&["plan", "labs/seed-001-ha.toml", "--output", "json"]);
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn schema_is_json_and_names_the_lab_keys() {
    let out = klab(&["schema"]);
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let props = schema["properties"].as_object().unwrap();
    for key in [
        "name",
        "networks",
        "nodes",
        "kubernetes",
        "defaults",
        "host",
        "timeouts",
    ] {
        assert!(props.contains_key(key), "schema lacks `{key}`");
    }
}

#[test]
fn render_writes_every_file_and_init_writes_an_example_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let out = klab(&[
        "render",
        "labs/quickstart.toml",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for rel in [
        "pool.xml",
        "nodes/cp1/domain.xml",
        "nodes/cp1/cloud-init/user-data",
        "nodes/cp1/cloud-init/network-config",
        "nodes/cp1/cloud-init/meta-data",
    ] {
        assert!(dir.path().join(rel).is_file(), "missing {rel}");
    }
    let lab = dir.path().join("lab.toml");
    let out = klab(&["init", lab.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(klab(&["validate", lab.to_str().unwrap()]).status.success());
    // A second init does not overwrite without --force.
    let out = klab(&["init", lab.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--force"));
}

#[test]
fn lab_names_from_the_command_line_cannot_escape_the_state_directory() {
    for bad in ["..", "../etc", "a/b", "UPPER"] {
        let out = klab(&["down", bad]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert!(
            text(&out.stderr).contains("is not a lab name"),
            "{bad}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_lab_file_that_is_not_utf8_gets_the_position_of_the_first_bad_byte() {
    let out = klab(&["validate", "tests/invalid/58-not-utf8.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "tests/invalid/58-not-utf8.toml:2:6: not UTF-8 (byte 0xe9)\n  hint: a lab file is UTF-8 text; convert it, e.g. `iconv -f latin1 -t utf-8`\n"
    );
}

/// `klab validate` on something that is not a regular file ends at once with a clear message.
fn refused_quickly(path: &str, kind: &str) {
    let started = std::time::Instant::now();
    let out = klab(&["validate", path]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{path}: took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{path}");
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: lab file {path} is not a regular file (it is {kind})\n  hint: pass a lab file (a regular file), e.g. lab.toml; `klab init` writes one\n"
        )
    );
}

#[test]
fn a_lab_file_that_never_ends_does_not_hang_validate() {
    refused_quickly("/dev/zero", "a device");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("lab.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    refused_quickly(fifo.to_str().unwrap(), "a FIFO");
    refused_quickly(dir.path().to_str().unwrap(), "a directory");
}

#[test]
fn a_lab_file_over_one_mib_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    let mut body = String::from("name = \"big\"\n");
    while body.len() <= 1024 * 1024 {
        body.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, body).unwrap();
    let out = klab(&["validate", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: lab file {} is larger than 1024 KiB; klab reads at most that much\n  hint: a lab file is a few KiB of TOML; is this the right file?\n",
            big.display()
        )
    );
}

#[test]
fn a_full_or_closed_stderr_does_not_panic() {
    // Full: every write fails with ENOSPC.
    let full = Command::new(env!("CARGO_BIN_EXE_klab"))
        .args(["validate", "tests/invalid/02-unknown-keys.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::fs::File::create("/dev/full").expect("/dev/full"))
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(1), "ENOSPC on stderr");
    // Closed: the reader went away before klab wrote (EPIPE).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let closed = Command::new(env!("CARGO_BIN_EXE_klab"))
        .args(["validate", "tests/invalid/02-unknown-keys.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(closed.status.code(), Some(1), "EPIPE on stderr");
    // A result that cannot be written to a full stdout is klab's failure, not a panic.
    let full_out = Command::new(env!("CARGO_BIN_EXE_klab"))
        .args(["validate", "labs/local.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::fs::File::create("/dev/full").expect("/dev/full"))
        .stderr(std::fs::File::create("/dev/full").expect("/dev/full"))
        .output()
        .unwrap();
    assert_eq!(
        full_out.status.code(),
        Some(2),
        "ENOSPC on stdout and stderr"
    );
}

#[test]
fn messages_escape_control_characters_in_values_from_the_command_line() {
    let out = klab(&["down", "a\u{1b}[2J\nb"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: `a\\u{1b}[2J\\nb` is not a lab name\n  hint: "),
        "{err:?}"
    );
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

fn klab_in(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_klab"))
        .args(args)
        // No lab.toml here, so only the host's labs can name the lab.
        .current_dir(data)
        .env("KLAB_DATA_DIR", data)
        .env_remove("KLAB_CONNECT")
        .env_remove("KLAB_STATE_DIR")
        .output()
        .expect("run klab")
}

/// Saved state of `lab` (from the lab file `file` in labs/, renamed) as `klab up` leaves it.
fn saved_lab(data: &Path, file: &str, name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("labs")
        .join(file);
    let mut lab = klab::config::load_file(&path).unwrap();
    lab.name = name.to_string();
    let inputs = klab::plan::PlanInputs {
        accel: klab::model::Accel::Qemu,
        uri: "qemu:///system".into(),
        pool_dir: data.join("pools").join(name).display().to_string(),
        image_cache: data.join("images").display().to_string(),
        console_dir: data.join("console").display().to_string(),
        keys: None,
        local_images: Vec::new(),
    };
    let plan = klab::plan::plan(&lab, &inputs);
    klab::state::StateDir::new(&data.join("labs"), name)
        .save_plan(&plan)
        .unwrap();
}

#[test]
fn ssh_without_a_lab_asks_which_lab_when_the_host_has_several() {
    let data = tempfile::tempdir().unwrap();
    // labs/local.toml has node1 and node2; labs/quickstart.toml has cp1 and w1.
    saved_lab(data.path(), "local.toml", "one");
    saved_lab(data.path(), "local.toml", "two");
    saved_lab(data.path(), "quickstart.toml", "three");

    let out = klab_in(data.path(), &["ssh", "node1", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: several labs on this host have a node `node1`: one, two\n  hint: name the lab: `klab ssh one/node1 -- …` or `klab ssh --lab one node1`\n"
    );
    // Only one lab has the node: still asked, never guessed.
    let out = klab_in(data.path(), &["ssh", "cp1", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: 3 labs on this host; which one do you mean? `three` has a node `cp1`\n  hint: name the lab: `klab ssh three/cp1 -- …` or `klab ssh --lab three cp1`\n"
    );
    let out = klab_in(data.path(), &["ssh", "db", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: no lab on this host has a node `db` (labs: one, three, two)\n  hint: `klab status LAB` lists a lab's nodes\n"
    );
}

#[test]
fn render_from_state_writes_the_keys_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let out_dir = data.path().join("out");
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/local.toml");
    let out = klab_in(
        data.path(),
        &[
            "render",
            lab.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--from-state",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let user_data = out_dir.join("nodes/node1/cloud-init/user-data");
    let content = std::fs::read_to_string(&user_data).unwrap();
    assert!(content.contains("PRIVATE KEY"), "no host key in the seed");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&user_data), 0o600);
    assert_eq!(mode(&out_dir.join("nodes/node1")), 0o700);
    assert_eq!(mode(&out_dir.join("nodes/node1/domain.xml")), 0o600);
}

/// A URI libvirt cannot reach, so a test never touches the host's hypervisor.
const NO_LIBVIRT: &str = "qemu+unix:///system?socket=/nonexistent/klab-test.sock";

/// Registry entries as `up` leaves them: `(lab, copy of, copy name, network)`.
fn registry(data: &Path, entries: &[(&str, Option<&str>, Option<&str>, &str)]) {
    let mut labs = serde_json::Map::new();
    for (lab, of, copy, net) in entries {
        let mut e = serde_json::json!({ "networks": [["lan", net]] });
        if let (Some(of), Some(copy)) = (of, copy) {
            e["copy_of"] = serde_json::json!(of);
            e["copy"] = serde_json::json!(copy);
        }
        labs.insert(lab.to_string(), e);
    }
    std::fs::write(
        data.join("registry.json"),
        serde_json::to_string(&serde_json::json!({ "version": 1, "labs": labs })).unwrap(),
    )
    .unwrap();
}

#[test]
fn ssh_takes_copy_like_the_other_commands() {
    let data = tempfile::tempdir().unwrap();
    saved_lab(data.path(), "local.toml", "one");
    saved_lab(data.path(), "local.toml", "one-1");
    registry(
        data.path(),
        &[
            ("one", None, None, "10.10.0.0/24"),
            ("one-1", Some("one"), Some("1"), "10.240.1.0/24"),
        ],
    );
    // Every way of naming the copy reaches lab one-1 (which has no node9: the error says so
    // before any connection).
    for args in [
        &["ssh", "--copy", "1", "node9", "--", "true"][..],
        &["ssh", "--lab", "one", "--copy", "1", "node9", "--", "true"],
        &["ssh", "one/node9", "--copy", "1", "--", "true"],
        &["ssh", "one-1/node9", "--", "true"],
    ] {
        let out = klab_in(data.path(), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error: lab `one-1` has no node `node9`"),
            "{args:?}: {err}"
        );
        assert!(err.contains("nodes are: node1, node2"), "{err}");
    }
    let out = klab_in(data.path(), &["ssh", "--copy", "7", "node1", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no lab on this host has a copy `7`"),
        "{}",
        text(&out.stderr)
    );
    let out = klab_in(
        data.path(),
        &["ssh", "--copy", "A/..", "node1", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is not a copy name"));
}

#[test]
fn ssh_config_json_is_one_document_with_the_config_and_known_hosts() {
    let data = tempfile::tempdir().unwrap();
    saved_lab(data.path(), "local.toml", "one-1");
    let state = klab::state::StateDir::new(&data.path().join("labs"), "one-1");
    state
        .write_file(
            "ssh_config",
            "Host one-1-node1 node1\n  HostName 10.0.0.1\n",
        )
        .unwrap();
    state
        .write_file("known_hosts", "10.0.0.1,node1 ssh-ed25519 AAAA\n")
        .unwrap();
    let out = klab_in(
        data.path(),
        &["ssh-config", "one", "--copy", "1", "--output", "json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["lab"], "one-1");
    assert_eq!(
        doc["config"],
        "Host one-1-node1 node1\n  HostName 10.0.0.1\n"
    );
    assert_eq!(doc["known_hosts"], "10.0.0.1,node1 ssh-ed25519 AAAA\n");
    assert!(
        doc["config_path"]
            .as_str()
            .unwrap()
            .ends_with("one-1/ssh_config")
    );
    // Text stays the config itself.
    let out = klab_in(data.path(), &["ssh-config", "one-1"]);
    assert_eq!(
        text(&out.stdout),
        "Host one-1-node1 node1\n  HostName 10.0.0.1\n"
    );
}

#[test]
fn down_all_copies_json_is_one_document_and_every_failure_is_named() {
    let data = tempfile::tempdir().unwrap();
    registry(
        data.path(),
        &[
            ("one-1", Some("one"), Some("1"), "10.240.1.0/24"),
            ("one-2", Some("one"), Some("2"), "10.240.2.0/24"),
        ],
    );
    let out = klab_in(
        data.path(),
        &[
            "down",
            "one",
            "--all-copies",
            "--output",
            "json",
            "--connect",
            NO_LIBVIRT,
        ],
    );
    // Neither copy can be reached: both are tried, both named, one document, exit 1.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", text(&out.stdout)));
    assert_eq!(doc["lab"], "one");
    assert_eq!(doc["copies"], serde_json::json!([]));
    let failed: Vec<&str> = doc["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["lab"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["one-1", "one-2"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("2 of 2 copies of lab one are not removed")
            && err.contains("one-1: ")
            && err.contains("one-2: "),
        "{err}"
    );

    // No copies: still one document.
    let out = klab_in(
        data.path(),
        &["down", "two", "--all-copies", "--output", "json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["copies"], serde_json::json!([]));
    assert_eq!(doc["failed"], serde_json::json!([]));
}

#[test]
fn list_json_stays_flat_and_every_copy_names_its_lab_and_networks() {
    let data = tempfile::tempdir().unwrap();
    saved_lab(data.path(), "local.toml", "one");
    saved_lab(data.path(), "local.toml", "one-1");
    // A lab the registry does not know: its networks come from its plan.
    saved_lab(data.path(), "quickstart.toml", "three");
    registry(
        data.path(),
        &[
            ("one", None, None, "10.10.0.0/24"),
            ("one-1", Some("one"), Some("1"), "10.240.1.0/24"),
        ],
    );
    let out = klab_in(
        data.path(),
        &["list", "--output", "json", "--connect", NO_LIBVIRT],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_name = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|l| l["lab"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {list}"))
            .clone()
    };
    let copy = by_name("one-1");
    assert_eq!(copy["copy_of"], "one");
    assert_eq!(copy["copy"], "1");
    assert_eq!(copy["networks"], serde_json::json!(["lan=10.240.1.0/24"]));
    let lab = by_name("one");
    assert_eq!(lab["copy_of"], serde_json::Value::Null);
    assert_eq!(lab["copies"], serde_json::json!(["one-1"]));
    let three = by_name("three");
    assert!(!three["networks"].as_array().unwrap().is_empty(), "{three}");
}

/// A Hyper-V lab never lands on libvirt: `up --dry-run` prints the PowerShell scripts of the up
/// (stdout, or one JSON document), a real `up` on this Linux host says what Hyper-V needs and
/// creates nothing (not even a state directory).
#[test]
fn a_hyperv_lab_is_previewed_as_powershell_and_never_brought_up_on_libvirt() {
    let data = tempfile::tempdir().unwrap();
    let lab = concat!(env!("CARGO_MANIFEST_DIR"), "/labs/seed-000-hyperv.toml");
    let out = klab_in(data.path(), &["up", lab, "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("# ---- new-vm klab-seed000hv-alma1 ----"),
        "{stdout}"
    );
    assert!(stdout.contains("New-VM"), "{stdout}");
    assert!(!stdout.contains("qemu:///"), "{stdout}");
    assert!(text(&out.stderr).contains("nothing executed"));

    let out = klab_in(data.path(), &["up", lab, "--dry-run", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["backend"], "hyperv");
    let ops: Vec<&str> = doc["scripts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops.first(), Some(&"preflight"));
    assert_eq!(ops.iter().filter(|o| **o == "new-vm").count(), 3, "{ops:?}");

    if klab::backend::hyperv::PowerShellRunner::detect(std::env::temp_dir()).is_none() {
        let out = klab_in(data.path(), &["up", lab]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(err.contains("Windows or WSL2"), "{err}");
        assert!(err.contains("--dry-run"), "{err}");
        assert!(!data.path().join("labs").join("seed000hv").exists());
        // doctor asks Hyper-V's questions, not libvirt's.
        let out = klab_in(data.path(), &["doctor", "-f", lab]);
        assert_eq!(out.status.code(), Some(1));
        let report = text(&out.stdout);
        assert!(report.contains("FAIL hyper-v"), "{report}");
        assert!(!report.contains("libvirt"), "{report}");
    }
}
