//! Commands that need no hypervisor: validate, plan, render, schema.

use std::path::Path;

use serde_json::json;

use super::{CmdError, load_lab, offline_inputs, templates};
use crate::cli::GlobalArgs;
use crate::output::Printer;

/// Example labs embedded in the binary (the files in labs/, which the tests also validate).
pub const EXAMPLES: &[(&str, &str)] = &[
    ("local", include_str!("../../labs/local.toml")),
    ("quickstart", include_str!("../../labs/quickstart.toml")),
    ("plain-vms", include_str!("../../labs/plain-vms.toml")),
    (
        "seed-000-kubespray-hyperv",
        include_str!("../../labs/seed-000-kubespray-hyperv.toml"),
    ),
    ("seed-001-ha", include_str!("../../labs/seed-001-ha.toml")),
    (
        "seed-004-bridge",
        include_str!("../../labs/seed-004-bridge.toml"),
    ),
];

pub fn init(
    p: &Printer,
    file: &Path,
    example: &str,
    list: bool,
    force: bool,
) -> Result<(), CmdError> {
    if list {
        for (name, text) in EXAMPLES {
            let about = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches('#')
                .trim();
            p.line(format!("{name:<28} {about}"));
        }
        return Ok(());
    }
    let Some((_, text)) = EXAMPLES.iter().find(|(n, _)| *n == example) else {
        return Err(CmdError::user(
            format!(
                "no embedded example named `{}`",
                crate::config::escape(example)
            ),
            format!(
                "examples: {}",
                EXAMPLES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    if file.exists() && !force {
        return Err(CmdError::user(
            format!("{} exists", file.display()),
            "pass --force to overwrite it, or name another file",
        ));
    }
    std::fs::write(file, text).map_err(|e| {
        CmdError::user(
            format!("cannot write {}: {e}", file.display()),
            "choose a writable path",
        )
    })?;
    p.line(format!(
        "wrote {} (example `{example}`); next: klab up {}",
        file.display(),
        file.display()
    ));
    Ok(())
}

pub fn validate(p: &Printer, file: &Path) -> Result<(), CmdError> {
    let lab = load_lab(file)?;
    if p.is_json() {
        p.json(&json!({ "valid": true, "lab": lab.name, "nodes": lab.nodes.len() }));
    } else {
        p.line(format!(
            "{}: lab `{}` is valid ({} nodes, {} networks{})",
            file.display(),
            lab.name,
            lab.nodes.len(),
            lab.networks.len(),
            if lab.kubernetes.is_some() {
                ", Kubernetes"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

pub fn plan(p: &Printer, g: &GlobalArgs, file: &Path) -> Result<(), CmdError> {
    let lab = load_lab(file)?;
    let plan = crate::plan::plan(&lab, &offline_inputs(&lab, g));
    if p.is_json() {
        p.json(&plan);
        return Ok(());
    }
    p.line(format!(
        "lab {} on {} (accelerator: {})",
        plan.lab,
        plan.uri,
        plan.accel.as_str()
    ));
    p.line(format!("  pool    {} {}", plan.pool.name, plan.pool.path));
    for n in &plan.networks {
        p.line(format!(
            "  network {:<28} {:<8} {}/{} bridge {}{}",
            n.name,
            n.mode.as_str(),
            n.address,
            n.prefix,
            n.bridge,
            n.host_ip
                .map(|ip| format!(" host {ip}"))
                .unwrap_or_default()
        ));
    }
    for node in &plan.nodes {
        p.line(format!(
            "  node    {:<12} {:<13} {} vCPU {} MiB  image {}",
            node.name,
            node.role.as_str(),
            node.cpus,
            node.memory_mib,
            node.image
        ));
        for nic in &node.nics {
            p.line(format!(
                "          {:<6} {:<17} {}/{} on {}{}",
                nic.ifname,
                nic.mac,
                nic.ip,
                nic.prefix,
                nic.network,
                nic.gateway
                    .map(|gw| format!(" (default route via {gw})"))
                    .unwrap_or_default()
            ));
        }
    }
    if let Some(k) = &plan.kubernetes {
        p.line(format!(
            "  kubernetes {} endpoint {} pods {} services {} cni calico {} ({})",
            k.version,
            k.control_plane_endpoint,
            k.pod_cidr,
            k.service_cidr,
            k.calico_version,
            k.calico_autodetect
        ));
    }
    for s in &plan.steps {
        p.line(format!(
            "  step    {:<20} {}{}",
            s.id,
            s.nodes.join(","),
            if s.serial { " (one at a time)" } else { "" }
        ));
    }
    Ok(())
}

pub fn render(
    p: &Printer,
    g: &GlobalArgs,
    file: &Path,
    out: &Path,
    from_state: bool,
) -> Result<(), CmdError> {
    let lab = load_lab(file)?;
    let mut inputs = offline_inputs(&lab, g);
    if from_state {
        let state = crate::state::StateDir::new(&crate::paths::state_root(), &lab.name);
        let nodes: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
        inputs.keys = Some(state.ensure_keys(&nodes, crate::keys::generate_ed25519)?);
        if inputs.accel == crate::model::Accel::Auto {
            inputs.accel = state
                .load_meta()?
                .and_then(|m| crate::model::Accel::parse(&m.accel))
                .unwrap_or(crate::model::Accel::Auto);
        }
        inputs.local_images = crate::image::ImageCache::new(crate::paths::image_cache())
            .local_images()
            .map_err(|e| CmdError::Internal(super::chain(&e)))?;
    }
    let plan = crate::plan::plan(&lab, &inputs);
    let rendered = crate::render::render_lab(&plan, inputs.keys.as_ref(), &templates(g)?)
        .map_err(|e| CmdError::user(super::chain(&e), "check your template overrides"))?;
    let mut written = Vec::new();
    for (rel, content) in rendered.files() {
        let path = out.join(&rel);
        if let Some(parent) = path.parent() {
            create_dirs(parent, from_state).map_err(|e| {
                CmdError::user(
                    format!("cannot create {}: {e}", parent.display()),
                    "choose a writable --out directory",
                )
            })?;
        }
        write_file(&path, content.as_bytes(), from_state).map_err(|e| {
            CmdError::user(
                format!("cannot write {}: {e}", path.display()),
                "choose a writable --out directory",
            )
        })?;
        written.push(path.display().to_string());
    }
    if p.is_json() {
        p.json(&json!({ "files": written }));
    } else {
        for w in &written {
            p.line(w);
        }
        p.line(format!(
            "{} files written{}",
            written.len(),
            if from_state {
                " (with this host's keys and images: keep them private)"
            } else {
                " (keys are placeholders; `klab up` renders real ones)"
            }
        ));
    }
    Ok(())
}

/// Directories for rendered files; owner-only when they will hold this host's keys.
fn create_dirs(dir: &Path, private: bool) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    if private {
        b.mode(0o700);
    }
    b.create(dir)
}

/// One rendered file. With real keys (`--from-state`) every file is 0600: the seeds hold the nodes'
/// SSH host private keys, and a file left from an earlier run gets the mode too.
fn write_file(path: &Path, content: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if private {
        o.mode(0o600);
    }
    let mut f = o.open(path)?;
    if private {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(content)
}

pub fn schema(p: &Printer) -> Result<(), CmdError> {
    p.json(&crate::config::schema_json());
    Ok(())
}
