//! PURE rendering of the Hyper-V backend's PowerShell scripts: one template per operation in
//! `powershell/`, embedded and overridable like the libvirt templates. Every value a script gets goes
//! through [`ps_quote`] (the `ps` filter): a single-quoted PowerShell literal, never raw text.
//!
//! The plan speaks libvirt (volume names, Linux paths); [`HvLab::from_plan`] maps it onto Hyper-V
//! objects: a switch per network, a VM per node, files under one Windows directory per lab.

use minijinja::value::Value;
use minijinja::{Error, ErrorKind, context};
use serde::Serialize;

use super::{RenderError, Templates};
use crate::model::NetworkMode;
use crate::plan::{LabPlan, OWNER_PREFIX};

pub const PS_BASE: &str = "hyperv-base.ps1.j2";
pub const PS_OBSERVE: &str = "hyperv-observe.ps1.j2";
pub const PS_GET_NETWORK: &str = "hyperv-get-network.ps1.j2";
pub const PS_ENSURE_SWITCH: &str = "hyperv-ensure-switch.ps1.j2";
pub const PS_REMOVE_SWITCH: &str = "hyperv-remove-switch.ps1.j2";
pub const PS_ENSURE_DIR: &str = "hyperv-ensure-dir.ps1.j2";
pub const PS_REMOVE_DIR: &str = "hyperv-remove-dir.ps1.j2";
pub const PS_NEW_DISK: &str = "hyperv-new-disk.ps1.j2";
pub const PS_REMOVE_FILE: &str = "hyperv-remove-file.ps1.j2";
pub const PS_NEW_VM: &str = "hyperv-new-vm.ps1.j2";
pub const PS_START_VM: &str = "hyperv-start-vm.ps1.j2";
pub const PS_REMOVE_VM: &str = "hyperv-remove-vm.ps1.j2";
pub const PS_PREFLIGHT: &str = "hyperv-preflight.ps1.j2";
pub const PS_STOP_VM: &str = "hyperv-stop-vm.ps1.j2";
pub const PS_VM_STATE: &str = "hyperv-vm-state.ps1.j2";
pub const PS_WSL_FORWARDING: &str = "hyperv-wsl-forwarding.ps1.j2";

/// The PowerShell templates: (file name, source).
pub const BUILTIN_PS: &[(&str, &str)] = &[
    (PS_BASE, include_str!("../../powershell/hyperv-base.ps1.j2")),
    (
        PS_OBSERVE,
        include_str!("../../powershell/hyperv-observe.ps1.j2"),
    ),
    (
        PS_GET_NETWORK,
        include_str!("../../powershell/hyperv-get-network.ps1.j2"),
    ),
    (
        PS_ENSURE_SWITCH,
        include_str!("../../powershell/hyperv-ensure-switch.ps1.j2"),
    ),
    (
        PS_REMOVE_SWITCH,
        include_str!("../../powershell/hyperv-remove-switch.ps1.j2"),
    ),
    (
        PS_ENSURE_DIR,
        include_str!("../../powershell/hyperv-ensure-dir.ps1.j2"),
    ),
    (
        PS_REMOVE_DIR,
        include_str!("../../powershell/hyperv-remove-dir.ps1.j2"),
    ),
    (
        PS_NEW_DISK,
        include_str!("../../powershell/hyperv-new-disk.ps1.j2"),
    ),
    (
        PS_REMOVE_FILE,
        include_str!("../../powershell/hyperv-remove-file.ps1.j2"),
    ),
    (
        PS_NEW_VM,
        include_str!("../../powershell/hyperv-new-vm.ps1.j2"),
    ),
    (
        PS_START_VM,
        include_str!("../../powershell/hyperv-start-vm.ps1.j2"),
    ),
    (
        PS_REMOVE_VM,
        include_str!("../../powershell/hyperv-remove-vm.ps1.j2"),
    ),
    (
        PS_STOP_VM,
        include_str!("../../powershell/hyperv-stop-vm.ps1.j2"),
    ),
    (
        PS_VM_STATE,
        include_str!("../../powershell/hyperv-vm-state.ps1.j2"),
    ),
    (
        PS_PREFLIGHT,
        include_str!("../../powershell/hyperv-preflight.ps1.j2"),
    ),
    (
        PS_WSL_FORWARDING,
        include_str!("../../powershell/hyperv-wsl-forwarding.ps1.j2"),
    ),
];

/// Default Windows directory under which klab keeps its files on a Hyper-V host.
pub const DEFAULT_HYPERV_ROOT: &str = r"C:\ProgramData\klab";

/// A value PowerShell cannot hold in a script literal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PsQuoteError {
    #[error("a NUL character cannot be passed to PowerShell")]
    Nul,
}

/// PowerShell's single-quote characters: `'` and the typographic ones the tokenizer also accepts
/// (U+2018 ‘, U+2019 ’, U+201A ‚, U+201B ‛). Any of them ends a single-quoted string unless doubled.
fn is_ps_single_quote(c: char) -> bool {
    matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}')
}

/// THE quoting function: `s` as a verbatim single-quoted PowerShell string literal. Inside single
/// quotes PowerShell expands nothing (`$x`, `$(…)`, backticks and newlines stay literal); each
/// single-quote character is doubled. NUL is refused (it cannot cross a command line).
pub fn ps_quote(s: &str) -> Result<String, PsQuoteError> {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\0' {
            return Err(PsQuoteError::Nul);
        }
        if is_ps_single_quote(c) {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    Ok(out)
}

/// The `ps` filter: strings → [`ps_quote`], integers as numbers, booleans as `$true`/`$false`.
/// Anything else (none, undefined, floats, maps) is a template bug.
pub(super) fn ps_filter(value: &Value) -> Result<String, Error> {
    if value.is_none() || value.is_undefined() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "`ps` filter applied to a missing value",
        ));
    }
    if let Some(s) = value.as_str() {
        return ps_quote(s).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()));
    }
    if let Ok(b) = bool::try_from(value.clone())
        && value.kind() == minijinja::value::ValueKind::Bool
    {
        return Ok(if b { "$true" } else { "$false" }.to_string());
    }
    if let Ok(n) = i64::try_from(value.clone()) {
        return Ok(n.to_string());
    }
    if let Ok(n) = u64::try_from(value.clone()) {
        return Ok(n.to_string());
    }
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("`ps` filter cannot quote a {} value", value.kind()),
    ))
}

/// One rendered script: the operation, the object it acts on (together the replay key) and text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PsScript {
    pub op: &'static str,
    pub object: String,
    pub text: String,
}

impl PsScript {
    /// `op object`, the key a replay runner matches on.
    pub fn key(&self) -> String {
        format!("{} {}", self.op, self.object)
    }
}

/// Marker every klab-made Hyper-V object's Notes carry: `klab:lab=<lab>` (+ ` node=<node>`).
pub fn notes_marker(lab: &str) -> String {
    format!("{OWNER_PREFIX}:lab={lab}")
}

/// Notes text for a switch (`node = None`) or a VM.
pub fn notes_tag(lab: &str, node: Option<&str>) -> String {
    match node {
        Some(n) => format!("{} node={n}", notes_marker(lab)),
        None => notes_marker(lab),
    }
}

/// Where a lab's files live on the Windows host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HvLayout {
    /// e.g. `C:\ProgramData\klab`.
    pub root: String,
}

impl Default for HvLayout {
    fn default() -> Self {
        Self {
            root: DEFAULT_HYPERV_ROOT.to_string(),
        }
    }
}

impl HvLayout {
    /// Directory of every per-lab directory (`pools`).
    pub fn pools_root(&self) -> String {
        format!(r"{}\pools", self.root.trim_end_matches('\\'))
    }
    /// `<root>\pools\<pool>`: the per-lab directory (the libvirt pool's counterpart).
    pub fn pool_dir(&self, pool: &str) -> String {
        format!(r"{}\{pool}", self.pools_root())
    }
    /// `<root>\images\<image>.vhdx`: the base VHDX converted once from the cached qcow2.
    pub fn base_vhdx(&self, image: &str) -> String {
        format!(r"{}\images\{image}.vhdx", self.root.trim_end_matches('\\'))
    }
}

/// Hyper-V file name of a plan volume: overlays `X.qcow2` → `X.vhdx`, seeds `X.img` → `X.iso`.
pub fn hv_file_name(volume: &str) -> String {
    if let Some(stem) = volume.strip_suffix(".qcow2") {
        format!("{stem}.vhdx")
    } else if let Some(stem) = volume.strip_suffix(".img") {
        format!("{stem}.iso")
    } else {
        volume.to_string()
    }
}

/// The plan volume name of a Hyper-V file (inverse of [`hv_file_name`]).
pub fn volume_name_of_file(file: &str) -> String {
    if let Some(stem) = file.strip_suffix(".vhdx") {
        format!("{stem}.qcow2")
    } else if let Some(stem) = file.strip_suffix(".iso") {
        format!("{stem}.img")
    } else {
        file.to_string()
    }
}

/// Hyper-V switch type for a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SwitchType {
    Internal,
    Private,
    External,
}

impl SwitchType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "Internal",
            Self::Private => "Private",
            Self::External => "External",
        }
    }
}

/// A lab network as a Hyper-V switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HvSwitch {
    /// Switch name = the plan's network name (`klab-<lab>-<key>`).
    pub name: String,
    pub switch_type: SwitchType,
    /// External switches: the host adapter (`[networks.x] bridge`).
    pub adapter: Option<String>,
    /// `vEthernet (<name>)`: the host's interface on an Internal switch.
    pub alias: String,
    /// Host address on the switch (Internal switches): the gateway, so the host reaches the nodes.
    pub host_ip: Option<String>,
    pub prefix: u8,
    /// `a.b.c.d/nn`.
    pub cidr: String,
    /// nat networks: the WinNAT klab would create (named like the switch).
    pub nat: bool,
    pub notes: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HvNic {
    /// Adapter name in the VM (the guest interface name, e.g. `ext0`).
    pub name: String,
    pub switch: String,
    /// 12 hex digits, upper case, as Hyper-V takes and reports them.
    pub mac: String,
}

/// A node as a Hyper-V VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HvVm {
    pub name: String,
    pub node: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Differencing VHDX and its parent.
    pub disk: String,
    pub disk_volume: String,
    pub parent: String,
    pub size_bytes: u64,
    /// NoCloud seed ISO (CIDATA).
    pub seed: String,
    pub seed_volume: String,
    pub nics: Vec<HvNic>,
    pub secure_boot: bool,
    pub notes: String,
}

/// The whole lab as Hyper-V objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HvLab {
    pub lab: String,
    pub prefix: String,
    pub pool: String,
    pub dir: String,
    pub layout: HvLayout,
    pub switches: Vec<HvSwitch>,
    pub vms: Vec<HvVm>,
}

/// `52:54:00:aa:bb:cc` → `525400AABBCC`.
pub fn hv_mac(mac: &str) -> String {
    mac.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// Hyper-V MAC (`00155D4B0111`) → `00:15:5d:4b:01:11` (for cloud-init and comparisons).
pub fn colon_mac(mac: &str) -> String {
    let hex: Vec<char> = mac
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    hex.chunks(2)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(":")
}

impl HvLab {
    /// Map the plan onto Hyper-V. `bridges` gives the host adapter of each bridge-mode network
    /// (the plan keeps it in `NetworkSpec::bridge`).
    pub fn from_plan(plan: &LabPlan, layout: &HvLayout) -> Self {
        let dir = layout.pool_dir(&plan.pool.name);
        let switches = plan
            .networks
            .iter()
            .map(|n| {
                let (switch_type, adapter, host_ip) = match n.mode {
                    NetworkMode::Bridge => (SwitchType::External, Some(n.bridge.clone()), None),
                    NetworkMode::Nat | NetworkMode::Isolated => (
                        SwitchType::Internal,
                        None,
                        n.host_ip.map(|ip| ip.to_string()),
                    ),
                };
                HvSwitch {
                    name: n.name.clone(),
                    switch_type,
                    adapter,
                    alias: format!("vEthernet ({})", n.name),
                    host_ip,
                    prefix: n.prefix,
                    cidr: format!("{}/{}", n.address, n.prefix),
                    nat: n.mode == NetworkMode::Nat,
                    notes: notes_tag(&plan.lab, None),
                }
            })
            .collect();
        let vms = plan
            .nodes
            .iter()
            .map(|n| HvVm {
                name: n.domain.clone(),
                node: n.name.clone(),
                cpus: n.cpus,
                memory_bytes: n.memory_mib * 1024 * 1024,
                disk: format!(r"{dir}\{}", hv_file_name(&n.overlay.name)),
                disk_volume: n.overlay.name.clone(),
                parent: layout.base_vhdx(&n.image),
                size_bytes: n.overlay.capacity_bytes,
                seed: format!(r"{dir}\{}", hv_file_name(&n.seed.name)),
                seed_volume: n.seed.name.clone(),
                nics: n
                    .nics
                    .iter()
                    .map(|c| HvNic {
                        name: c.ifname.clone(),
                        switch: c.libvirt_network.clone(),
                        mac: hv_mac(&c.mac),
                    })
                    .collect(),
                secure_boot: true,
                notes: notes_tag(&plan.lab, Some(&n.name)),
            })
            .collect();
        Self {
            lab: plan.lab.clone(),
            prefix: plan.prefix.clone(),
            pool: plan.pool.name.clone(),
            dir,
            layout: layout.clone(),
            switches,
            vms,
        }
    }

    pub fn switch(&self, name: &str) -> Option<&HvSwitch> {
        self.switches.iter().find(|s| s.name == name)
    }
    pub fn vm(&self, name: &str) -> Option<&HvVm> {
        self.vms.iter().find(|v| v.name == name)
    }
    pub fn vm_by_disk_volume(&self, volume: &str) -> Option<&HvVm> {
        self.vms.iter().find(|v| v.disk_volume == volume)
    }
}

/// What `ensure-switch` must do, decided by the backend from what exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SwitchSteps {
    pub create: bool,
    pub host_ip: bool,
    pub nat_create: bool,
}

fn script(
    t: &Templates,
    template: &'static str,
    op: &'static str,
    object: &str,
    ctx: Value,
) -> Result<PsScript, RenderError> {
    let ctx = context! { op => op, template => template, ..ctx };
    Ok(PsScript {
        op,
        object: object.to_string(),
        text: t.render(template, object, ctx)?,
    })
}

/// Every script the Hyper-V backend runs.
impl Templates {
    pub fn ps_observe(&self, prefix: &str, layout: &HvLayout) -> Result<PsScript, RenderError> {
        let marker = format!("{OWNER_PREFIX}:lab=");
        script(
            self,
            PS_OBSERVE,
            "observe",
            prefix,
            context! { prefix, marker, pools_root => layout.pools_root() },
        )
    }

    pub fn ps_get_network(&self, s: &HvSwitch) -> Result<PsScript, RenderError> {
        script(
            self,
            PS_GET_NETWORK,
            "get-network",
            &s.name,
            context! { switch => s.name.as_str(), alias => s.alias.as_str() },
        )
    }

    pub fn ps_ensure_switch(
        &self,
        s: &HvSwitch,
        steps: SwitchSteps,
    ) -> Result<PsScript, RenderError> {
        script(
            self,
            PS_ENSURE_SWITCH,
            "ensure-switch",
            &s.name,
            context! {
                switch => s.name.as_str(),
                switch_type => s.switch_type.as_str(),
                adapter => s.adapter.as_deref(),
                alias => s.alias.as_str(),
                notes => s.notes.as_str(),
                host_ip => if steps.host_ip { s.host_ip.as_deref() } else { None },
                prefix => s.prefix,
                create => steps.create,
                nat_create => steps.nat_create,
                nat_name => s.name.as_str(),
                cidr => s.cidr.as_str(),
            },
        )
    }

    /// Remove switch `name` (only when tagged for any lab) and the NAT klab named after it.
    pub fn ps_remove_switch(&self, name: &str) -> Result<PsScript, RenderError> {
        let marker = format!("{OWNER_PREFIX}:lab=");
        script(
            self,
            PS_REMOVE_SWITCH,
            "remove-switch",
            name,
            context! { switch => name, marker, nat_name => name },
        )
    }

    pub fn ps_ensure_dir(&self, dir: &str, tag_file: &str) -> Result<PsScript, RenderError> {
        script(
            self,
            PS_ENSURE_DIR,
            "ensure-dir",
            dir,
            context! { dir, tag_file },
        )
    }

    pub fn ps_remove_dir(&self, dir: &str, tag_file: &str) -> Result<PsScript, RenderError> {
        script(
            self,
            PS_REMOVE_DIR,
            "remove-dir",
            dir,
            context! { dir, tag_file },
        )
    }

    pub fn ps_new_disk(&self, vm: &HvVm) -> Result<PsScript, RenderError> {
        script(
            self,
            PS_NEW_DISK,
            "new-disk",
            &vm.disk,
            context! { path => vm.disk.as_str(), parent => vm.parent.as_str(), size_bytes => vm.size_bytes },
        )
    }

    pub fn ps_remove_file(&self, path: &str) -> Result<PsScript, RenderError> {
        script(self, PS_REMOVE_FILE, "remove-file", path, context! { path })
    }

    pub fn ps_new_vm(&self, vm: &HvVm) -> Result<PsScript, RenderError> {
        script(
            self,
            PS_NEW_VM,
            "new-vm",
            &vm.name,
            context! {
                vm => vm.name.as_str(),
                memory_bytes => vm.memory_bytes,
                cpus => vm.cpus,
                disk => vm.disk.as_str(),
                seed => vm.seed.as_str(),
                nics => super::value::to_value(&vm.nics),
                secure_boot => vm.secure_boot,
                notes => vm.notes.as_str(),
            },
        )
    }

    pub fn ps_start_vm(&self, name: &str) -> Result<PsScript, RenderError> {
        script(self, PS_START_VM, "start-vm", name, context! { vm => name })
    }

    /// Remove VM `name` (only when tagged) and its disks and ISOs under the layout's root.
    pub fn ps_remove_vm(&self, name: &str, layout: &HvLayout) -> Result<PsScript, RenderError> {
        let marker = format!("{OWNER_PREFIX}:lab=");
        script(
            self,
            PS_REMOVE_VM,
            "remove-vm",
            name,
            context! { vm => name, marker, pools_root => format!(r"{}\", layout.pools_root()) },
        )
    }
}

impl Templates {
    pub fn ps_stop_vm(&self, name: &str) -> Result<PsScript, RenderError> {
        script(self, PS_STOP_VM, "stop-vm", name, context! { vm => name })
    }

    pub fn ps_vm_state(&self, name: &str) -> Result<PsScript, RenderError> {
        script(self, PS_VM_STATE, "vm-state", name, context! { vm => name })
    }

    /// Rights and Hyper-V availability, checked before anything is created.
    pub fn ps_preflight(&self) -> Result<PsScript, RenderError> {
        script(self, PS_PREFLIGHT, "preflight", "host", context! {})
    }

    /// Forwarding state of the WSL adapter and of the given `vEthernet (…)` aliases.
    pub fn ps_wsl_forwarding(&self, aliases: &[String]) -> Result<PsScript, RenderError> {
        script(
            self,
            PS_WSL_FORWARDING,
            "wsl-forwarding",
            "host",
            context! { aliases => super::value::to_value(&aliases) },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_plain_and_empty() {
        assert_eq!(ps_quote("klab-lab-net").unwrap(), "'klab-lab-net'");
        assert_eq!(ps_quote("").unwrap(), "''");
        assert_eq!(
            ps_quote(r"C:\ProgramData\klab").unwrap(),
            r"'C:\ProgramData\klab'"
        );
    }

    #[test]
    fn quote_hostile_values() {
        assert_eq!(ps_quote("it's").unwrap(), "'it''s'");
        assert_eq!(
            ps_quote("'; Remove-Item C:\\ -Recurse; '").unwrap(),
            "'''; Remove-Item C:\\ -Recurse; '''"
        );
        // Expansion syntax is literal inside single quotes: passed through unchanged.
        assert_eq!(ps_quote("$(Stop-Computer)").unwrap(), "'$(Stop-Computer)'");
        assert_eq!(ps_quote("$env:PATH").unwrap(), "'$env:PATH'");
        assert_eq!(ps_quote("a`nb`").unwrap(), "'a`nb`'");
        assert_eq!(ps_quote("line1\nline2\r\n").unwrap(), "'line1\nline2\r\n'");
        assert_eq!(ps_quote("\"double\"").unwrap(), "'\"double\"'");
        // Typographic single quotes also end a PowerShell string: doubled too.
        assert_eq!(ps_quote("a\u{2019}b").unwrap(), "'a\u{2019}\u{2019}b'");
        assert_eq!(
            ps_quote("\u{2018}\u{201A}\u{201B}").unwrap(),
            "'\u{2018}\u{2018}\u{201A}\u{201A}\u{201B}\u{201B}'"
        );
        assert_eq!(ps_quote("ノード—ü").unwrap(), "'ノード—ü'");
        assert_eq!(ps_quote("a\0b"), Err(PsQuoteError::Nul));
    }

    /// A quoted literal read back the way PowerShell's tokenizer does gives the original.
    #[test]
    fn quote_round_trips_through_a_single_quote_reader() {
        fn unquote(q: &str) -> String {
            let inner: Vec<char> = q.chars().collect();
            assert!(is_ps_single_quote(inner[0]) && is_ps_single_quote(inner[inner.len() - 1]));
            let body = &inner[1..inner.len() - 1];
            let mut out = String::new();
            let mut i = 0;
            while i < body.len() {
                if is_ps_single_quote(body[i]) {
                    // Inside a literal a quote char must come doubled, else the string ended.
                    assert!(i + 1 < body.len() && is_ps_single_quote(body[i + 1]), "{q}");
                    out.push(body[i]);
                    i += 2;
                } else {
                    out.push(body[i]);
                    i += 1;
                }
            }
            out
        }
        for v in [
            "plain",
            "it's",
            "''''",
            "\u{2019}'\u{2018}",
            "$(x)`'\n",
            "end'",
            "'start",
        ] {
            assert_eq!(unquote(&ps_quote(v).unwrap()), v);
        }
    }

    #[test]
    fn filter_numbers_bools_and_missing() {
        assert_eq!(ps_filter(&Value::from(42u64)).unwrap(), "42");
        assert_eq!(ps_filter(&Value::from(true)).unwrap(), "$true");
        assert_eq!(ps_filter(&Value::from(false)).unwrap(), "$false");
        assert_eq!(ps_filter(&Value::from("a'b")).unwrap(), "'a''b'");
        assert!(ps_filter(&Value::from(())).is_err());
        assert!(ps_filter(&Value::UNDEFINED).is_err());
        assert!(ps_filter(&Value::from(1.5)).is_err());
        let e = ps_filter(&Value::from("x\0")).unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    }

    #[test]
    fn macs_and_file_names() {
        assert_eq!(hv_mac("52:54:00:99:f1:f6"), "52540099F1F6");
        assert_eq!(colon_mac("00155D4B0111"), "00:15:5d:4b:01:11");
        assert_eq!(hv_file_name("alma1.qcow2"), "alma1.vhdx");
        assert_eq!(hv_file_name("alma1-seed.img"), "alma1-seed.iso");
        assert_eq!(volume_name_of_file("alma1.vhdx"), "alma1.qcow2");
        assert_eq!(volume_name_of_file("alma1-seed.iso"), "alma1-seed.img");
        assert_eq!(volume_name_of_file("klab-owner-x.tag"), "klab-owner-x.tag");
        let l = HvLayout::default();
        assert_eq!(l.pool_dir("klab-x"), r"C:\ProgramData\klab\pools\klab-x");
        assert_eq!(
            l.base_vhdx("almalinux-9"),
            r"C:\ProgramData\klab\images\almalinux-9.vhdx"
        );
    }

    #[test]
    fn every_script_starts_with_the_preamble_and_quotes_hostile_names() {
        let t = Templates::builtin().unwrap();
        let hostile = "klab-x-'$(calc)`\n\u{2019}";
        let s = t.ps_start_vm(hostile).unwrap();
        let lines: Vec<&str> = s.text.lines().collect();
        assert_eq!(lines[1], "$ErrorActionPreference = 'Stop'");
        assert_eq!(lines[2], "$ProgressPreference = 'SilentlyContinue'");
        assert_eq!(
            lines[3],
            "[Console]::OutputEncoding = [Text.Encoding]::UTF8"
        );
        assert!(
            s.text
                .contains("$name = 'klab-x-''$(calc)`\n\u{2019}\u{2019}'\n"),
            "{}",
            s.text
        );
        assert!(t.ps_start_vm("a\0").is_err());
    }
}
