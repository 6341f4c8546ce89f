//! `klab doctor`: libvirt reachable, accelerators, libvirt's dnsmasq directory, permissions, and
//! (with a lab file) the host checks `klab up` runs before creating anything
//! ([`crate::usecase::host`]).

use std::path::Path;

use serde::Serialize;

use super::{CmdError, resolve_uri};
use crate::cli::GlobalArgs;
use crate::output::Printer;
use crate::usecase::host::HostFs;

#[derive(Debug, Serialize)]
struct Check {
    check: String,
    ok: bool,
    detail: String,
}

pub async fn doctor(p: &Printer, g: &GlobalArgs, file: Option<&Path>) -> Result<(), CmdError> {
    let lab = match file {
        Some(f) => Some(super::load_lab(f)?),
        None => None,
    };
    if let Some(l) = lab
        .as_ref()
        .filter(|l| l.host.backend == crate::model::BackendKind::Hyperv)
    {
        let t = std::sync::Arc::new(super::templates(g)?);
        let (l, inputs) = (l.clone(), super::offline_inputs(l, g));
        // powershell.exe runs the checks: off the async runtime.
        let checks = crate::usecase::blocking(move || {
            Ok(crate::usecase::hyperv::host_checks(&l, &inputs, t))
        })
        .await?
        .into_iter()
        .map(|(check, ok, detail)| Check { check, ok, detail })
        .collect();
        return report(p, checks);
    }
    let uri = resolve_uri(g, lab.as_ref());
    let mut checks = Vec::new();
    let mut push = |check: &str, ok: bool, detail: String| {
        checks.push(Check {
            check: check.to_string(),
            ok,
            detail,
        })
    };

    let env = super::env(p);
    let host = HostFs::default();
    match env.connect(&uri).await {
        Ok(backend) => {
            push("libvirt", true, format!("connected to {uri}"));
            match env
                .call(&backend, "read capabilities", |b| b.accel_support())
                .await
            {
                Ok(s) => {
                    push(
                        "accelerator",
                        s.kvm || s.qemu,
                        format!(
                            "KVM {}, QEMU/TCG {}{}",
                            if s.kvm { "offered" } else { "not offered" },
                            if s.qemu { "offered" } else { "not offered" },
                            if s.kvm {
                                "; if guests hang right after the kernel starts (nested virtualization), use --accel qemu"
                            } else {
                                ""
                            }
                        ),
                    );
                }
                Err(e) => push("accelerator", false, e.to_string()),
            }
        }
        Err(e) => push(
            "libvirt",
            false,
            format!(
                "{e}{}",
                e.hint().map(|h| format!(" — {h}")).unwrap_or_default()
            ),
        ),
    }
    if crate::usecase::is_local_system_uri(&uri) {
        match host.dnsmasq_dir() {
            Ok(()) => push(
                "libvirt dirs",
                true,
                format!("{} exists", host.libvirt_dnsmasq.display()),
            ),
            Err(problem) => push("libvirt dirs", false, problem),
        }
    }
    push(
        "/dev/kvm",
        Path::new("/dev/kvm").exists(),
        if Path::new("/dev/kvm").exists() {
            "present".into()
        } else {
            "absent: guests run under TCG (slower)".into()
        },
    );

    // qemu runs as an unprivileged user under qemu:///system: image and pool paths must be reachable.
    let data = crate::paths::data_root();
    let mut cur = Some(data.as_path());
    let mut blocked = None;
    while let Some(dir) = cur {
        if let Ok(md) = std::fs::metadata(dir) {
            use std::os::unix::fs::PermissionsExt;
            if md.permissions().mode() & 0o001 == 0 {
                blocked = Some(dir.to_path_buf());
            }
        }
        cur = dir.parent();
    }
    push(
        "permissions",
        blocked.is_none(),
        match blocked {
            None => format!("{} is reachable by the qemu user", data.display()),
            Some(d) => format!(
                "{} is not searchable by others; qemu cannot read images below it (chmod o+x {} or set KLAB_DATA_DIR)",
                d.display(),
                d.display()
            ),
        },
    );
    for tool in ["debootstrap", "mkfs.ext4"] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        push(
            tool,
            true,
            if found {
                "found (for `klab image build`)".into()
            } else {
                "missing: only needed by `klab image build` (apt-get install debootstrap e2fsprogs)"
                    .into()
            },
        );
    }
    if let Some(lab) = &lab {
        let plan = crate::plan::plan(lab, &super::offline_inputs(lab, g));
        match host.preflight(&plan, false) {
            Ok(()) => push(
                "lab networks",
                true,
                format!("no clashes for lab `{}`", lab.name),
            ),
            Err(problems) => push("lab networks", false, problems.join("; ")),
        }
        if plan
            .kubernetes
            .as_ref()
            .is_some_and(|k| k.control_plane_vip.is_some())
        {
            let root = crate::paths::state_root();
            let others: Vec<crate::plan::LabPlan> = crate::state::list_labs(&root)
                .unwrap_or_default()
                .iter()
                .filter_map(|l| {
                    crate::state::StateDir::new(&root, l)
                        .load_plan()
                        .ok()
                        .flatten()
                })
                .collect();
            let conflicts = crate::usecase::host::vip_conflicts(&plan, &others);
            if conflicts.iter().all(|(ok, _)| *ok) {
                push(
                    "vip",
                    true,
                    "no other lab on this host uses the VIP".to_string(),
                );
            }
            for (ok, msg) in conflicts {
                push("vip", ok, msg);
            }
            match host.vip_answers(&plan) {
                Some(Ok(msg)) => push("vip", true, msg),
                Some(Err(msg)) => push("vip", false, msg),
                None => push(
                    "vip",
                    true,
                    "the host has no bridge towards the VIP yet; `klab up` creates the cluster network".to_string(),
                ),
            }
        }
    }

    report(p, checks)
}

fn report(p: &Printer, checks: Vec<Check>) -> Result<(), CmdError> {
    let failed = checks.iter().filter(|c| !c.ok).count();
    if p.is_json() {
        p.json(&serde_json::json!({ "ok": failed == 0, "checks": checks }));
    } else {
        for c in &checks {
            p.line(format!(
                "{} {:<14} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.check,
                c.detail
            ));
        }
    }
    if failed > 0 {
        return Err(CmdError::user(
            format!("{failed} check(s) failed"),
            "fix the items marked FAIL; scripts/setup-host.sh installs and starts what klab needs on Debian",
        ));
    }
    Ok(())
}
