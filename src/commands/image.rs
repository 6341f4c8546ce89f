//! `klab image build|list`.

use serde_json::json;

use super::{CmdError, chain};
use crate::cli::ImageCommand;
use crate::output::Printer;

pub async fn image(p: &Printer, cmd: ImageCommand) -> Result<(), CmdError> {
    let cache = crate::image::ImageCache::new(crate::paths::image_cache());
    match cmd {
        ImageCommand::Build {
            name,
            force,
            with_containerd,
            mirror,
        } => {
            if name != "debian-12" {
                return Err(CmdError::user(
                    format!("`klab image build` cannot build `{name}`"),
                    "only `debian-12` can be built locally (from Debian packages); other catalog images are downloaded",
                ));
            }
            if force {
                let users = labs_using(&cache.base_path(&name).display().to_string())?;
                if !users.is_empty() {
                    return Err(CmdError::user(
                        format!(
                            "image `{name}` is the backing file of the disks of lab(s) {}; rebuilding it would corrupt them",
                            users.join(", ")
                        ),
                        "remove those labs first (`klab down NAME`), then rebuild",
                    ));
                }
            }
            let opts = crate::image::BuildOptions {
                force,
                with_containerd,
                mirror,
                ..Default::default()
            };
            let spinner = p.spinner("image debian-12");
            spinner.step("building with debootstrap (about a minute)");
            let c = cache.clone();
            let built = tokio::task::spawn_blocking(move || crate::image::build_debian12(&c, &opts))
                .await
                .map_err(|e| CmdError::Internal(e.to_string()))?
                .map_err(|e| {
                    spinner.fail("build failed");
                    CmdError::user(
                        chain(&e),
                        "`klab image build` needs root, debootstrap and e2fsprogs, and a reachable Debian mirror (--mirror)",
                    )
                })?;
            spinner.done("built");
            if p.is_json() {
                p.json(&json!({
                    "image": built.key,
                    "path": built.path,
                    "kernel": built.kernel,
                    "initrd": built.initrd,
                    "cmdline": built.cmdline,
                    "bytes": built.file_bytes,
                    "sha256": built.sha256,
                    "reused": built.reused,
                    "seconds": built.elapsed.as_secs_f64(),
                }));
            } else {
                p.line(format!(
                    "{} {} ({} MiB, sha256 {}, {:.0}s){}",
                    if built.reused { "kept" } else { "built" },
                    built.path.display(),
                    built.file_bytes >> 20,
                    &built.sha256[..built.sha256.len().min(12)],
                    built.elapsed.as_secs_f64(),
                    if built.reused {
                        "; --force rebuilds it"
                    } else {
                        ""
                    }
                ));
                p.line("labs with `image = \"debian-12\"` now use this image (direct kernel boot, no download)");
            }
            Ok(())
        }
        ImageCommand::List => {
            let local = cache
                .local_images()
                .map_err(|e| CmdError::Internal(chain(&e)))?;
            if p.is_json() {
                p.json(&json!({
                    "cache": cache.root(),
                    "built": local.iter().map(|l| json!({"name": l.key, "path": l.path, "kernel": l.kernel})).collect::<Vec<_>>(),
                    "catalog": crate::catalog::CATALOG.iter().map(|c| json!({"name": c.name, "url": c.url, "cached": cache.base_path(c.name).exists()})).collect::<Vec<_>>(),
                }));
                return Ok(());
            }
            p.line(format!("image cache: {}", cache.root().display()));
            for c in crate::catalog::CATALOG {
                let built = local.iter().any(|l| l.key == c.name);
                let cached = cache.base_path(c.name).exists();
                p.line(format!(
                    "  {:<14} {}",
                    c.name,
                    if built {
                        "built locally".to_string()
                    } else if cached {
                        "downloaded".to_string()
                    } else {
                        format!("not cached ({})", c.url)
                    }
                ));
            }
            Ok(())
        }
    }
}

/// Labs (with state on this host) whose plan uses `base_path` as a backing file.
fn labs_using(base_path: &str) -> Result<Vec<String>, CmdError> {
    let root = crate::paths::state_root();
    let mut users = Vec::new();
    for lab in crate::state::list_labs(&root)? {
        let Some(saved) = crate::state::StateDir::new(&root, &lab).load_plan()? else {
            continue;
        };
        let uses = saved.images.iter().any(|i| i.base_path == base_path);
        if uses {
            users.push(lab);
        }
    }
    Ok(users)
}
