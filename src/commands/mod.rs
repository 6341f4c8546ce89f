//! One module per verb. Shared plumbing: error → exit code, lab/URI/accelerator resolution.

pub mod doctor;
pub mod down;
pub mod image;
pub mod info;
pub mod kube;
pub mod offline;
pub mod snapshot;
pub mod ssh;
pub mod up;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cli::{Cli, Command, GlobalArgs};
use crate::config;
use crate::model::{Accel, Lab};
use crate::output::Printer;

pub use crate::usecase::DEFAULT_URI;

/// Errors at the CLI edge (the use cases' errors). `exit_code` maps them: 1 = the user can fix
/// it, 2 = klab failed.
pub use crate::usecase::{Error as CmdError, chain};

/// The use cases' environment for this process: libvirt, russh, the image cache, paths from the
/// environment.
pub fn env(printer: &Printer) -> crate::usecase::Env {
    crate::usecase::Env::system(printer.clone())
}

pub async fn run(cli: Cli) -> Result<(), CmdError> {
    let printer = Printer::new(cli.global.output);
    let g = &cli.global;
    match cli.command {
        Command::Init {
            file,
            example,
            list,
            force,
        } => offline::init(&printer, &file, &example, list, force),
        Command::Validate { file } => offline::validate(&printer, &file),
        Command::Plan { file } => offline::plan(&printer, g, &file),
        Command::Render {
            file,
            out,
            from_state,
        } => offline::render(&printer, g, &file, &out, from_state),
        Command::Schema => offline::schema(&printer),
        Command::Up(args) => up::up(&printer, g, &args).await,
        Command::Down(args) => down::down(&printer, g, &args).await,
        Command::Status { name, file, copy } => {
            info::status(&printer, g, with_copy(resolve_lab_name(name, file)?, copy)?).await
        }
        Command::List => info::list(&printer, g).await,
        Command::Ssh { node, lab, command } => ssh::ssh(&printer, g, &node, lab, command).await,
        Command::SshConfig { name, copy } => match copy {
            None => ssh::ssh_config(&printer, name),
            Some(c) => ssh::ssh_config(
                &printer,
                Some(with_copy(resolve_lab_name(name, None)?, Some(c))?),
            ),
        },
        Command::Doctor { file } => doctor::doctor(&printer, g, file.as_deref()).await,
        Command::Image(cmd) => image::image(&printer, cmd).await,
        Command::Provision(args) => kube::provision(&printer, g, &args).await,
        Command::Snapshot(cmd) => snapshot::snapshot(&printer, g, cmd).await,
        Command::Reset { name, copy, to } => {
            snapshot::reset(
                &printer,
                g,
                with_copy(resolve_lab_name(name, None)?, copy)?,
                &to,
            )
            .await
        }
        Command::Kubeconfig(args) => kube::kubeconfig(&printer, &args),
    }
}

pub fn load_lab(file: &Path) -> Result<Lab, CmdError> {
    let checked = config::check_file(file).map_err(|e| match e {
        config::LoadError::Invalid(d) => CmdError::Invalid(d),
        other => CmdError::user(chain(&other), other.hint()),
    })?;
    // Warnings (an end-of-life Kubernetes minor) go to stderr; the lab is valid.
    for w in &checked.warnings {
        crate::output::stderr(&format!(
            "warning: {w}
"
        ));
    }
    Ok(checked.lab)
}

/// `--connect` / `KLAB_CONNECT` > `[host] uri` > `qemu:///system`.
pub fn resolve_uri(g: &GlobalArgs, lab: Option<&Lab>) -> String {
    g.connect
        .clone()
        .or_else(|| lab.and_then(|l| l.host.uri.clone()))
        .unwrap_or_else(|| DEFAULT_URI.to_string())
}

/// `--accel` / `KLAB_ACCEL` > `[host] accel` > auto.
pub fn requested_accel(g: &GlobalArgs, lab: Option<&Lab>) -> Accel {
    g.accel
        .as_deref()
        .and_then(Accel::parse)
        .or_else(|| lab.map(|l| l.host.accel))
        .unwrap_or(Accel::Auto)
}

/// Template overrides from `--templates DIR`: every regular file in it, by file name.
pub fn template_overrides(g: &GlobalArgs) -> Result<BTreeMap<String, String>, CmdError> {
    let mut out = BTreeMap::new();
    let Some(dir) = &g.templates else {
        return Ok(out);
    };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        CmdError::user(
            format!("cannot read template directory {}: {e}", dir.display()),
            "--templates takes a directory with files named like those in network-templates/ and cloud-init/",
        )
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file()
            && let Some(name) = path.file_name().and_then(|n| n.to_str())
        {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                CmdError::user(
                    format!("cannot read template {}: {e}", path.display()),
                    "template files must be UTF-8 text",
                )
            })?;
            out.insert(name.to_string(), text);
        }
    }
    Ok(out)
}

pub fn templates(g: &GlobalArgs) -> Result<crate::render::Templates, CmdError> {
    crate::render::Templates::new(template_overrides(g)?).map_err(|e| {
        CmdError::user(
            chain(&e),
            "override files must have the names of the built-in templates (see `klab render --help`)",
        )
    })
}

/// Which lab a name-taking command means: the name, else the file's lab, else ./lab.toml's, else
/// the only lab with state on this host.
pub fn resolve_lab_name(name: Option<String>, file: Option<PathBuf>) -> Result<String, CmdError> {
    if let Some(n) = name {
        return check_lab_name(n);
    }
    if let Some(f) = file {
        return Ok(load_lab(&f)?.name);
    }
    let default = Path::new("lab.toml");
    if default.exists() {
        return Ok(load_lab(default)?.name);
    }
    let labs = crate::state::list_labs(&crate::paths::state_root())?;
    match labs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CmdError::user(
            "no lab named and no lab.toml here",
            "name the lab (`klab down NAME`) or pass the file with -f; `klab list` shows the labs on this host",
        )),
        many => Err(CmdError::user(
            format!("several labs on this host: {}", many.join(", ")),
            "name the lab you mean",
        )),
    }
}

/// `LAB` or, with `--copy NAME`, the copy's lab name (`LAB-NAME`, shortened as `up` shortens it).
pub fn with_copy(lab: String, copy: Option<String>) -> Result<String, CmdError> {
    match copy {
        None => Ok(lab),
        Some(c) if crate::copies::is_copy_name(&c) => Ok(crate::copies::copy_lab_name(&lab, &c)),
        Some(c) => Err(CmdError::user(
            format!("`{}` is not a copy name", crate::config::escape(&c)),
            "`klab list` shows the labs and their copies on this host",
        )),
    }
}

/// A lab name from the command line: the same rule as in lab files, so it can never reach outside
/// the state root (`..`, `/`) or match objects of a lab with another name.
pub fn check_lab_name(name: String) -> Result<String, CmdError> {
    if crate::config::units::is_lab_name(&name) {
        Ok(name)
    } else {
        Err(CmdError::user(
            format!("`{}` is not a lab name", crate::config::escape(&name)),
            format!(
                "lab names are lowercase letters, digits and `-`, at most {} characters; `klab list` shows the labs on this host",
                crate::config::units::LAB_NAME_MAX
            ),
        ))
    }
}

/// Plan inputs that do not depend on this machine's state: used by `plan` and `render`, so the
/// same lab file gives byte-identical output everywhere.
pub fn offline_inputs(lab: &Lab, g: &GlobalArgs) -> crate::plan::PlanInputs {
    crate::plan::PlanInputs {
        accel: requested_accel(g, Some(lab)),
        uri: resolve_uri(g, Some(lab)),
        pool_dir: crate::paths::pool_dir(&lab.name).display().to_string(),
        image_cache: crate::paths::image_cache().display().to_string(),
        console_dir: crate::paths::console_dir().display().to_string(),
        keys: None,
        local_images: Vec::new(),
    }
}
