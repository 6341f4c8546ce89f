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
