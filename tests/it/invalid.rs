//! The invalid-lab corpus: every `tests/invalid/<nn>-<slug>.toml` must fail validation with exactly
//! the diagnostics in its sibling `.expected` file (the full Display output, file name included).
//! `KLAB_BLESS=1 cargo test --test it invalid` rewrites the `.expected` files — review every change.

use std::fs;
use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid")
}

fn files(ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(corpus_dir())
        .expect("tests/invalid exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn invalid_labs_give_exactly_the_expected_diagnostics() {
    let bless = std::env::var_os("KLAB_BLESS").is_some_and(|v| v == "1");
    let labs = files("toml");
    assert!(
        labs.len() >= 35,
        "the corpus should hold at least 35 labs, found {}",
        labs.len()
    );
    let mut failures = Vec::new();
    for lab in &labs {
        let name = lab.file_name().unwrap().to_string_lossy().into_owned();
        let shown = format!("tests/invalid/{name}");
        // Bytes, not text: the corpus holds a lab that is not UTF-8.
        let src = fs::read(lab).unwrap();
        let actual = match klab::config::parse_bytes(&src, &shown) {
            Ok(_) => {
                failures.push(format!("{shown}: validated, but it must be rejected"));
                continue;
            }
            Err(d) => format!("{d}\n"),
        };
        let expected_path = lab.with_extension("expected");
        if bless {
            fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        match fs::read_to_string(&expected_path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!(
                "{shown}: diagnostics differ\n--- expected\n{expected}--- actual\n{actual}"
            )),
            Err(_) => failures.push(format!("{shown}: missing {}", expected_path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_expected_file_has_its_lab() {
    for exp in files("expected") {
        assert!(
            exp.with_extension("toml").exists(),
            "{} has no .toml",
            exp.display()
        );
    }
}

#[test]
fn multi_error_files_report_every_error() {
    // The corpus must exercise "all errors in one run": some files give several diagnostics.
    let multi = files("expected")
        .iter()
        .filter(|p| {
            let text = fs::read_to_string(p).unwrap();
            text.lines()
                .filter(|l| l.starts_with("tests/invalid/"))
                .count()
                >= 3
        })
        .count();
    assert!(
        multi >= 3,
        "only {multi} corpus files have three or more errors"
    );
}
