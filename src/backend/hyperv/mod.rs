//! The Hyper-V backend: the same [`Backend`] seam as libvirt, driven through PowerShell scripts
//! rendered from `powershell/*.ps1.j2` and run by a [`PsRunner`] (the real `powershell.exe`, on
//! Windows or from WSL2, or a replay of recorded outputs in tests).
//!
//! The trait's arguments are libvirt-shaped (object names and XML). This backend ignores the XML and
//! takes what it needs from the lab's [`HvLab`] (derived from the same plan), looked up by the
//! object name it is given: networks → switches, domains → VMs, pools → one directory per lab,
//! overlay volumes → differencing VHDX files, seed volumes → ISO files. Removal needs only names,
//! so `klab down` works without the lab file.
//!
//! Ownership: a switch's or VM's Notes carry `klab:lab=<lab>` (VMs add ` node=<node>`); the removal
//! scripts refuse objects without it. A lab directory holds `klab-owner-<lab>.tag`.

pub mod checks;
pub mod iso;
pub mod json;
pub mod ps;
pub mod runner;
pub mod vhdx;

use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use super::{
    AccelSupport, Backend, BackendError, DomainState, Observed, ObservedDomain, ObservedNetwork,
    ObservedNic, ObservedPool, ObservedVolume, Result, xml,
};
use crate::observed::pool_tag_volume;
use crate::render::Templates;
use crate::render::powershell::{
    HvLab, HvLayout, HvSwitch, PsScript, SwitchSteps, SwitchType, hv_file_name, volume_name_of_file,
};
pub use runner::{DryRunRunner, PowerShellRunner, PsOutput, PsRunner, ReplayRunner};

/// Every script is bounded; VM creation with a large differencing disk is the slowest step.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

pub struct HyperVBackend {
    runner: Arc<dyn PsRunner>,
    templates: Arc<Templates>,
    layout: HvLayout,
    /// The lab being brought up; `None` for `down`/`status` without a lab file.
    lab: Option<HvLab>,
    timeout: Duration,
}

impl std::fmt::Debug for HyperVBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperVBackend")
            .field("runner", &self.runner.describe())
            .field("layout", &self.layout)
            .field("lab", &self.lab.as_ref().map(|l| &l.lab))
            .finish()
    }
}

/// `qemu-img` arguments that turn a cached qcow2 into the dynamic base VHDX Hyper-V boots from.
pub fn vhdx_convert_args(qcow2: &str, vhdx: &str) -> Vec<String> {
    [
        "convert",
        "-f",
        "qcow2",
        "-O",
        "vhdx",
        "-o",
        "subformat=dynamic",
        qcow2,
        vhdx,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl HyperVBackend {
    pub fn new(
        runner: Arc<dyn PsRunner>,
        templates: Arc<Templates>,
        layout: HvLayout,
        lab: Option<HvLab>,
    ) -> Self {
        Self {
            runner,
            templates,
            layout,
            lab,
            timeout: DEFAULT_SCRIPT_TIMEOUT,
        }
    }

    /// The backend for a lab on this machine: `powershell.exe` on Windows or from WSL2 (`scratch`
    /// holds `-File` scripts), the lab's plan mapped onto Hyper-V when there is one (`up`), none for
    /// `down`/`status`/`list`. Plain Linux has no Hyper-V: an error that says so.
    pub fn connect(
        plan: Option<&crate::plan::LabPlan>,
        templates: Arc<Templates>,
        layout: HvLayout,
        scratch: std::path::PathBuf,
    ) -> Result<Self> {
        let runner = PowerShellRunner::detect(scratch).ok_or_else(|| BackendError::Connect {
            uri: "hyperv".into(),
            message: "Hyper-V needs Windows or WSL2 (no /proc/sys/kernel/osrelease naming microsoft/WSL here)".into(),
        })?;
        let lab = plan.map(|p| HvLab::from_plan(p, &layout));
        Ok(Self::new(Arc::new(runner), templates, layout, lab))
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn script(
        &self,
        op: &'static str,
        kind: &'static str,
        name: &str,
        f: impl FnOnce(&Templates) -> std::result::Result<PsScript, crate::render::RenderError>,
    ) -> Result<PsScript> {
        f(&self.templates).map_err(|e| BackendError::op(op, kind, name, chain(&e)))
    }

    /// Run a script; the result JSON, or the cmdlet's own error message.
    fn run(
        &self,
        op: &'static str,
        kind: &'static str,
        name: &str,
        script: &PsScript,
    ) -> Result<serde_json::Value> {
        let out = self
            .runner
            .run(script, self.timeout)
            .map_err(|e| BackendError::op(op, kind, name, e))?;
        ps::read_result(&out.stdout, &out.stderr, out.code)
            .map_err(|m| BackendError::op(op, kind, name, m))
    }

    fn lab(&self, op: &'static str, kind: &'static str, name: &str) -> Result<&HvLab> {
        self.lab.as_ref().ok_or_else(|| {
            BackendError::op(
                op,
                kind,
                name,
                "the Hyper-V backend needs the lab's plan to create objects",
            )
        })
    }

    /// Decide what `ensure-switch` must do from what the host has.
    pub fn switch_steps(
        &self,
        s: &HvSwitch,
        doc: &json::NetworkDoc,
    ) -> std::result::Result<SwitchSteps, String> {
        let lab = self
            .lab
            .as_ref()
            .map(|l| l.lab.as_str())
            .unwrap_or_default();
        let mut steps = SwitchSteps::default();
        match doc.switches.iter().find(|x| x.name == s.name) {
            None => steps.create = true,
            Some(existing) => {
                match json::owner_from_notes(&existing.notes) {
                    Some(t) if t.lab == lab => {}
                    Some(t) => {
                        return Err(format!(
                            "switch `{}` belongs to lab `{}`; klab leaves it alone",
                            s.name, t.lab
                        ));
                    }
                    None => {
                        return Err(format!(
                            "a switch `{}` exists without klab's tag in its Notes; klab leaves it alone (rename or remove it)",
                            s.name
                        ));
                    }
                }
                if existing.switch_type != s.switch_type {
                    return Err(format!(
                        "switch `{}` is {} but the lab needs {}; `klab down` and up again to recreate it",
                        s.name,
                        existing.switch_type.as_str(),
                        s.switch_type.as_str()
                    ));
                }
            }
        }
        if let Some(ip) = &s.host_ip {
            steps.host_ip = !doc
                .addresses
                .iter()
                .any(|a| a.alias == s.alias && &a.ip == ip && a.prefix_length == s.prefix);
        }
        if s.nat {
            steps.nat_create = nat_decision(&s.cidr, &doc.nats)?;
        }
        Ok(steps)
    }
}

/// WinNAT allows one NAT network per host: `Ok(false)` reuses one that covers `cidr`, `Ok(true)`
/// creates one, `Err` names the conflicting NAT.
pub fn nat_decision(cidr: &str, nats: &[json::NatInfo]) -> std::result::Result<bool, String> {
    let want: Ipv4Network = cidr
        .parse()
        .map_err(|e| format!("`{cidr}` is not a network: {e}"))?;
    let mut others = Vec::new();
    for n in nats {
        match n.prefix.parse::<Ipv4Network>() {
            Ok(have) if have.prefix() <= want.prefix() && have.contains(want.network()) => {
                return Ok(false);
            }
            _ => others.push(format!("`{}` ({})", n.name, n.prefix)),
        }
    }
    if others.is_empty() {
        return Ok(true);
    }
    Err(format!(
        "this host already has the NAT network {}, which does not cover {cidr}, and Windows allows one \
         NAT per host: remove it (`Remove-NetNat -Name …`) if nothing needs it, or give the nat network \
         a cidr inside it",
        others.join(", ")
    ))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `C:\dir` + `file`.
fn win_join(dir: &str, file: &str) -> String {
    format!(r"{}\{file}", dir.trim_end_matches('\\'))
}

impl Backend for HyperVBackend {
    fn kind(&self) -> &'static str {
        "hyperv"
    }

    fn uri(&self) -> String {
        format!("hyperv via {}", self.runner.describe())
    }

    /// Hyper-V has its own accelerator; the libvirt accel choice does not apply. Reported as
    /// "no KVM, QEMU-compatible" so `auto` resolves without asking.
    fn accel_support(&self) -> Result<AccelSupport> {
        Ok(AccelSupport {
            kvm: false,
            qemu: true,
        })
    }

    fn observe(&self, prefix: &str) -> Result<Observed> {
        let script = self.script("observe", "host", prefix, |t| {
            t.ps_observe(prefix, &self.layout)
        })?;
        let v = self.run("observe", "host", prefix, &script)?;
        let doc =
            json::parse_observe(&v).map_err(|e| BackendError::op("observe", "host", prefix, e))?;
        let mut out = Observed::default();
        for vm in doc.vms {
            let mut disks = vm.hard_drives;
            disks.extend(vm.dvd_drives);
            let nics = vm
                .adapters
                .iter()
                .map(|a| ObservedNic {
                    network: a.switch_name.clone().unwrap_or_default(),
                    // Connected to its switch = attached; a disconnected adapter has no switch.
                    attached: Some(a.switch_name.is_some()),
                })
                .collect();
            out.domains.push(ObservedDomain {
                nics,
                owner: json::owner_from_notes(&vm.notes),
                state: json::domain_state(&vm.state),
                name: vm.name,
                disks,
            });
        }
        for s in doc.switches {
            let bridge = match s.switch_type {
                SwitchType::External => Some(s.adapter_description.clone()),
                SwitchType::Internal => Some(format!("vEthernet ({})", s.name)),
                SwitchType::Private => None,
            };
            out.networks.push(ObservedNetwork {
                owner: json::owner_from_notes(&s.notes).map(|mut t| {
                    t.node = None;
                    t
                }),
                name: s.name,
                active: true,
                bridge,
            });
        }
        for p in doc.pools {
            let owner = p
                .files
                .iter()
                .find_map(|f| xml::lab_from_tag_volume(f))
                .map(str::to_string);
            for f in &p.files {
                out.volumes.push(ObservedVolume {
                    pool: p.name.clone(),
                    name: volume_name_of_file(f),
                    path: win_join(&p.path, f),
                });
            }
            out.pools.push(ObservedPool {
                name: p.name,
                path: Some(p.path),
                active: true,
                owner,
            });
        }
        Ok(out)
    }

    fn ensure_network(&self, name: &str, _xml: &str) -> Result<()> {
        let lab = self.lab("ensure", "network", name)?;
        let s = lab.switch(name).ok_or_else(|| {
            BackendError::op("ensure", "network", name, "not a network of this lab")
        })?;
        let script = self.script("ensure", "network", name, |t| t.ps_get_network(s))?;
        let v = self.run("ensure", "network", name, &script)?;
        let doc =
            json::parse_network(&v).map_err(|e| BackendError::op("ensure", "network", name, e))?;
        let steps = self
            .switch_steps(s, &doc)
            .map_err(|m| BackendError::op("ensure", "network", name, m))?;
        if steps == SwitchSteps::default() {
            tracing::debug!(
                switch = name,
                "switch, host address and NAT already in place"
            );
            return Ok(());
        }
        let script = self.script("ensure", "network", name, |t| t.ps_ensure_switch(s, steps))?;
        self.run("ensure", "network", name, &script).map(drop)
    }

    fn remove_network(&self, name: &str) -> Result<()> {
        let script = self.script("remove", "network", name, |t| t.ps_remove_switch(name))?;
        self.run("remove", "network", name, &script).map(drop)
    }

    fn ensure_pool(&self, name: &str, _xml: &str, lab: &str) -> Result<()> {
        let dir = self.layout.pool_dir(name);
        let tag = pool_tag_volume(lab);
        let script = self.script("ensure", "pool", name, |t| t.ps_ensure_dir(&dir, &tag))?;
        self.run("ensure", "pool", name, &script).map(drop)
    }

    fn remove_pool(&self, name: &str) -> Result<()> {
        let lab = name.strip_prefix("klab-").unwrap_or(name);
        let dir = self.layout.pool_dir(name);
        let tag = pool_tag_volume(lab);
        let script = self.script("remove", "pool", name, |t| t.ps_remove_dir(&dir, &tag))?;
        self.run("remove", "pool", name, &script).map(drop)
    }

    fn create_volume(&self, pool: &str, xml: &str) -> Result<()> {
        let vol = xml::object_name(xml).unwrap_or_default();
        let lab = self.lab("create", "volume", &vol)?;
        let vm = lab.vm_by_disk_volume(&vol).ok_or_else(|| {
            BackendError::op(
                "create",
                "volume",
                &format!("{pool}/{vol}"),
                "not a node disk of this lab",
            )
        })?;
        let script = self.script("create", "volume", &vol, |t| t.ps_new_disk(vm))?;
        self.run("create", "volume", &vol, &script).map(drop)
    }

    /// The seed: written as the ISO 9660 CIDATA image Hyper-V attaches as a DVD (a vfat seed from
    /// the executor is rewritten with the same files).
    fn upload_volume(&self, pool: &str, name: &str, data: &[u8]) -> Result<()> {
        let path = win_join(&self.layout.pool_dir(pool), &hv_file_name(name));
        let iso =
            iso::seed_as_iso(data).map_err(|m| BackendError::op("upload", "volume", name, m))?;
        self.runner
            .write_file(&path, &iso)
            .map_err(|e| BackendError::op("upload", "volume", name, e))
    }

    fn remove_volume(&self, pool: &str, name: &str) -> Result<()> {
        let path = win_join(&self.layout.pool_dir(pool), &hv_file_name(name));
        let script = self.script("remove", "volume", name, |t| t.ps_remove_file(&path))?;
        self.run("remove", "volume", name, &script).map(drop)
    }

    fn define_and_start(&self, name: &str, _xml: &str) -> Result<()> {
        let lab = self.lab("define", "domain", name)?;
        let vm = lab
            .vm(name)
            .ok_or_else(|| BackendError::op("define", "domain", name, "not a node of this lab"))?;
        let script = self.script("define", "domain", name, |t| t.ps_new_vm(vm))?;
        self.run("define", "domain", name, &script).map(drop)
    }

    fn start_domain(&self, name: &str) -> Result<()> {
        let script = self.script("start", "domain", name, |t| t.ps_start_vm(name))?;
        self.run("start", "domain", name, &script).map(drop)
    }

    fn stop_domain(&self, name: &str) -> Result<()> {
        let script = self.script("stop", "domain", name, |t| t.ps_stop_vm(name))?;
        self.run("stop", "domain", name, &script).map(drop)
    }

    fn domain_state(&self, name: &str) -> Result<Option<DomainState>> {
        let script = self.script("query", "domain", name, |t| t.ps_vm_state(name))?;
        let v = self.run("query", "domain", name, &script)?;
        let vms = json::parse_vms(&v).map_err(|e| BackendError::op("query", "domain", name, e))?;
        Ok(vms
            .iter()
            .find(|vm| vm.name == name)
            .map(|vm| json::domain_state(&vm.state)))
    }

    fn remove_domain(&self, name: &str) -> Result<()> {
        let script = self.script("remove", "domain", name, |t| {
            t.ps_remove_vm(name, &self.layout)
        })?;
        self.run("remove", "domain", name, &script).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(name: &str, prefix: &str) -> json::NatInfo {
        json::NatInfo {
            name: name.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn nat_is_created_reused_or_a_named_conflict() {
        assert_eq!(nat_decision("192.168.160.0/24", &[]), Ok(true));
        assert_eq!(
            nat_decision(
                "192.168.160.0/24",
                &[nat("klab-x-outside", "192.168.160.0/24")]
            ),
            Ok(false)
        );
        assert_eq!(
            nat_decision("192.168.160.0/24", &[nat("shared", "192.168.0.0/16")]),
            Ok(false)
        );
        assert_eq!(
            nat_decision("192.168.0.0/16", &[nat("small", "192.168.160.0/24")]),
            Err("this host already has the NAT network `small` (192.168.160.0/24), which does not cover \
                 192.168.0.0/16, and Windows allows one NAT per host: remove it (`Remove-NetNat -Name …`) \
                 if nothing needs it, or give the nat network a cidr inside it"
                .into())
        );
    }

    #[test]
    fn qemu_img_converts_to_a_dynamic_vhdx() {
        assert_eq!(
            vhdx_convert_args(
                "/var/lib/klab/images/almalinux-9.qcow2",
                "/mnt/c/ProgramData/klab/images/almalinux-9.vhdx"
            )
            .join(" "),
            "convert -f qcow2 -O vhdx -o subformat=dynamic /var/lib/klab/images/almalinux-9.qcow2 /mnt/c/ProgramData/klab/images/almalinux-9.vhdx"
        );
    }
}
