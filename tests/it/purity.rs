//! The pure core (plan, render, model, catalog, reconcile) must not reach for I/O, processes, the
//! clock, randomness, the environment, tokio or a backend.

use std::path::{Path, PathBuf};

const FORBIDDEN: &[&str] = &[
    "std::fs",
    "tokio",
    "crate::backend",
    "std::process",
    "std::time::SystemTime",
    "rand::",
    "std::env",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn pure_modules_import_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src.join("plan"), &mut files);
    rust_files(&src.join("render"), &mut files);
    for f in ["model.rs", "catalog.rs", "reconcile.rs"] {
        let p = src.join(f);
        if p.exists() {
            files.push(p);
        }
    }
    assert!(
        files.len() >= 4,
        "pure sources not found under {}",
        src.display()
    );
    let mut violations = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        for (no, line) in text.lines().enumerate() {
            for pat in FORBIDDEN {
                if line.contains(pat) {
                    violations.push(format!(
                        "{}:{}: `{pat}`: {}",
                        f.display(),
                        no + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "pure modules use I/O:\n{}",
        violations.join("\n")
    );
}
