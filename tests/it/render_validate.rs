//! Rendered files checked by the real tools: `virt-xml-validate` (libvirt's schemas) for every XML,
//! `cloud-init schema` for user-data and `cloud-init devel net-convert` for network-config.
//! A missing tool fails the test unless `KLAB_TEST_ALLOW_MISSING_TOOLS=1` (see tools.rs).

use std::path::Path;
use std::process::Command;

use klab::plan::{self, fixtures};
use klab::render::{self, Templates};

use super::labs_plan::{cases, render_with_test_keys};
use super::tools;

/// Run a validator; `false` when the tool is absent and the opt-out is set.
fn run(tool: &str, args: &[&str], what: &str) -> bool {
    let found = match tool {
        // virt-xml-validate is a shell script around xmllint, which libvirt-clients does not pull in.
        "virt-xml-validate" => tools::require(tool, "libvirt-clients")
            .and_then(|p| tools::require("xmllint", "libxml2-utils").map(|_| p)),
        _ => tools::require(tool, tool),
    };
    let Some(path) = found else {
        return false;
    };
    let out = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{tool} rejected {what}:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn xml_kind(path: &str) -> Option<&'static str> {
    if path == "pool.xml" {
        Some("storagepool")
    } else if path.starts_with("networks/") {
        Some("network")
    } else if path.ends_with("/domain.xml") {
        Some("domain")
    } else if path.ends_with("/overlay.xml") {
        Some("storagevol")
    } else {
        None
    }
}

fn validate_files(case: &str, files: &[(String, String)], dir: &Path) {
    for (rel, content) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, content).expect("write");
        let p = path.to_string_lossy().into_owned();
        let what = format!("{case}: {rel}");
        if let Some(kind) = xml_kind(rel) {
            run("virt-xml-validate", &[&p, kind], &what);
        } else if rel.ends_with("/user-data") {
            run("cloud-init", &["schema", "--config-file", &p], &what);
        } else if rel.ends_with("/network-config") {
            let out = dir.join(format!("{rel}.networkd"));
            let out = out.to_string_lossy().into_owned();
            let rendered = run(
                "cloud-init",
                &[
                    "devel",
                    "net-convert",
                    "-p",
                    &p,
                    "-k",
                    "yaml",
                    "-D",
                    "debian",
                    "-d",
                    &out,
                    "-O",
                    "networkd",
                ],
                &what,
            );
            if rendered {
                check_networkd(&what, content, Path::new(&out));
            }
        }
    }
}

/// net-convert must have produced one .network unit per NIC with its address and MAC.
fn check_networkd(what: &str, network_config: &str, out: &Path) {
    let dir = out.join("etc/systemd/network");
    let mut units = String::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{what}: no networkd output: {e}")) {
        units.push_str(&std::fs::read_to_string(e.expect("entry").path()).expect("read unit"));
    }
    let macs = network_config
        .lines()
        .filter_map(|l| l.trim().strip_prefix("macaddress: "))
        .map(|m| m.trim_matches('"').to_string())
        .collect::<Vec<_>>();
    assert!(!macs.is_empty(), "{what}: no NICs");
    for mac in macs {
        assert!(
            units.contains(&mac),
            "{what}: networkd units lack {mac}:\n{units}"
        );
    }
    let defaults = units.matches("Gateway=").count();
    assert_eq!(
        defaults, 1,
        "{what}: exactly one default route expected:\n{units}"
    );
}

#[test]
fn rendered_files_pass_libvirt_and_cloud_init_validators() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, lab) in cases() {
        let (_, r) = render_with_test_keys(&lab);
        validate_files(&name, &r.files(), &tmp.path().join(&name));
    }
}

#[test]
fn placeholder_keys_still_pass_cloud_init_schema() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, lab) in cases() {
        let p = plan::plan(&lab, &fixtures::inputs(&lab.name));
        let t = Templates::builtin().expect("templates");
        let r = render::render_lab(&p, None, &t).expect("render");
        let files: Vec<_> = r
            .files()
            .into_iter()
            .filter(|(path, _)| path.ends_with("/user-data"))
            .take(1)
            .collect();
        assert!(files[0].1.contains("placeholder-generated-at-klab-up"));
        validate_files(
            &format!("{name} (placeholders)"),
            &files,
            &tmp.path().join(&name),
        );
    }
}

#[test]
fn kvm_accel_renders_kvm_with_host_passthrough() {
    let lab = fixtures::ha_lab();
    let mut inputs = fixtures::inputs(&lab.name);
    inputs.accel = klab::model::Accel::Kvm;
    let p = plan::plan(&lab, &inputs);
    let t = Templates::builtin().expect("templates");
    let r = render::render_lab(&p, None, &t).expect("render");
    let files: Vec<_> = r
        .files()
        .into_iter()
        .filter(|(path, _)| path == "nodes/cp1/domain.xml")
        .collect();
    assert!(files[0].1.starts_with("<domain type='kvm'>"));
    assert!(files[0].1.contains("<cpu mode='host-passthrough'/>"));
    let tmp = tempfile::tempdir().expect("tempdir");
    validate_files("kvm", &files, tmp.path());
}

/// The same network-config through the other renderers cloud-init uses (Alma: sysconfig and
/// NetworkManager, Ubuntu: netplan), on the three-NIC worker of the HA fixture.
#[test]
fn network_config_converts_for_every_guest_renderer() {
    let (_, r) = render_with_test_keys(&fixtures::ha_lab());
    let w1 = r.nodes.iter().find(|n| n.name == "w1").expect("w1");
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("network-config");
    std::fs::write(&input, &w1.seed.network_config).expect("write");
    let input = input.to_string_lossy().into_owned();
    for (distro, kind) in [
        ("almalinux", "sysconfig"),
        ("almalinux", "network-manager"),
        ("ubuntu", "netplan"),
    ] {
        let out = tmp.path().join(kind).to_string_lossy().into_owned();
        let args = [
            "devel",
            "net-convert",
            "-p",
            &input,
            "-k",
            "yaml",
            "-D",
            distro,
            "-d",
            &out,
            "-O",
            kind,
        ];
        run("cloud-init", &args, &format!("w1 network-config as {kind}"));
    }
}
