//! The pure core (config, plan, render, model, catalog, observed, reconcile, verify) must not reach
//! for I/O, processes, the clock, randomness, the environment, tokio or a backend.
//!
//! Test code (`#[cfg(test)]` to the end of a file) is not checked, and a line may opt out only with
//! an `// io-edge:` comment saying why (the lab loader's one file read).

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
    rust_files(&src.join("config"), &mut files);
    rust_files(&src.join("reconcile"), &mut files);
    for f in [
        "model.rs",
        "catalog.rs",
        "reconcile.rs",
        "observed.rs",
        "verify.rs",
        "kubeconfig.rs",
        "copies.rs",
    ] {
        let p = src.join(f);
        if p.exists() {
            files.push(p);
        }
    }
    assert!(
        files.len() >= 12,
        "pure sources not found under {}",
        src.display()
    );
    let mut violations = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        if f.ends_with("reconcile/tests.rs") {
            continue;
        }
        let mut prev = "";
        for (no, line) in text.lines().enumerate() {
            if line.trim() == "#[cfg(test)]" {
                break;
            }
            // The marker comment exempts the statement right below it.
            let exempt = prev.contains("// io-edge:");
            prev = line;
            if exempt || line.trim_start().starts_with("//") {
                continue;
            }
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

#[test]
fn the_opt_out_marker_is_used_once() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let uses: Vec<_> = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .contains(concat!("// io", "-edge:"))
        })
        .collect();
    assert_eq!(uses.len(), 1, "io-edge markers: {uses:?}");
}
