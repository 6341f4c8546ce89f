//! Every lab in `labs/` (plus the hand-built fixtures) planned and rendered with fixed test keys:
//! the plan JSON and every rendered file are snapshots, and the output is byte-identical across runs.

use std::path::{Path, PathBuf};

use klab::model::Lab;
use klab::plan::{self, LabPlan, fixtures};
use klab::render::{self, RenderedLab, Templates};

fn labs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("labs")
}

/// (case name, lab): the fixtures always, plus every `labs/*.toml` once the loader parses them.
pub(crate) fn cases() -> Vec<(String, Lab)> {
    let mut out = vec![
        ("fixture-ha".to_string(), fixtures::ha_lab()),
        ("fixture-plain".to_string(), fixtures::plain_lab()),
    ];
    let mut files: Vec<PathBuf> = std::fs::read_dir(labs_dir())
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    assert!(!files.is_empty(), "no labs/*.toml found");
    for path in files {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let src = std::fs::read_to_string(&path).expect("read lab file");
        let file = format!("labs/{stem}.toml");
        match klab::config::parse_str(&src, &file) {
            Ok(lab) => out.push((stem, lab)),
            Err(d) => panic!("{file} does not validate: {d:?}"),
        }
    }
    out
}

pub(crate) fn plan_with_test_keys(lab: &Lab) -> LabPlan {
    let mut inputs = fixtures::inputs(&lab.name);
    inputs.keys = Some(fixtures::test_keys(lab));
    plan::plan(lab, &inputs)
}

pub(crate) fn render_with_test_keys(lab: &Lab) -> (LabPlan, RenderedLab) {
    let p = plan_with_test_keys(lab);
    let keys = fixtures::test_keys(lab);
    let t = Templates::builtin().expect("built-in templates parse");
    let r = render::render_lab(&p, Some(&keys), &t).expect("render");
    (p, r)
}

#[test]
fn plan_and_render_snapshots() {
    for (name, lab) in cases() {
        let (p, r) = render_with_test_keys(&lab);
        let json = serde_json::to_string_pretty(&p).expect("plan serializes");
        insta::assert_snapshot!(format!("{name}__plan.json"), json);
        for (path, content) in r.files() {
            insta::assert_snapshot!(format!("{name}__{path}"), content);
        }
    }
}

#[test]
fn plan_and_render_are_deterministic() {
    for (name, lab) in cases() {
        let (p1, r1) = render_with_test_keys(&lab);
        let (p2, r2) = render_with_test_keys(&lab.clone());
        assert_eq!(
            serde_json::to_string(&p1).expect("json"),
            serde_json::to_string(&p2).expect("json"),
            "{name}: plan differs between runs"
        );
        assert_eq!(r1.files(), r2.files(), "{name}: rendered files differ");
    }
}

#[test]
fn every_node_and_network_is_rendered_and_tagged() {
    for (name, lab) in cases() {
        let (p, r) = render_with_test_keys(&lab);
        assert_eq!(r.nodes.len(), lab.nodes.len(), "{name}");
        assert_eq!(r.networks.len(), lab.networks.len(), "{name}");
        for (net, xml) in &r.networks {
            assert!(
                xml.contains(plan::OWNER_NS),
                "{name}: {net} lacks the owner tag"
            );
            assert!(
                xml.contains(&format!("<name>{net}</name>")),
                "{name}: {net}"
            );
        }
        for (node, spec) in r.nodes.iter().zip(&p.nodes) {
            let tag = format!("name=\"{}\" node=\"{}\"", p.lab, spec.name);
            assert!(
                node.domain_xml.contains(&tag),
                "{name}: {} lacks {tag}",
                spec.name
            );
            for nic in &spec.nics {
                assert!(node.domain_xml.contains(&nic.mac), "{name}: {}", spec.name);
                assert!(node.seed.network_config.contains(&nic.mac), "{name}");
            }
            assert!(node.seed.meta_data.contains(&spec.instance_id), "{name}");
        }
    }
}
