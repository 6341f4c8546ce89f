//! Checks before `up` and for `klab doctor`: rights (administrator or Hyper-V Administrators;
//! host addresses and WinNAT need an elevated shell) and, from WSL2, IP forwarding on the WSL
//! adapter and the lab's Internal switches (WSL2 in NAT mode cannot reach other switches without it).

use serde_json::Value;

use super::HyperVBackend;
use super::json::{JsonError, as_list};
use crate::backend::{BackendError, Result};
use crate::render::powershell::ps_quote;

/// One problem and the exact fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub problem: String,
    pub fix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    pub user: String,
    pub administrator: bool,
    pub hyperv_administrators: bool,
    pub hyperv_module: bool,
    /// `Running`, `Stopped`, … or `Missing`.
    pub vmms: String,
}

fn field<'a>(v: &'a Value, key: &str, what: &'static str) -> Result<&'a Value, JsonError> {
    v.get(key).ok_or_else(|| JsonError::Shape {
        what,
        field: key.to_string(),
        problem: "is missing".into(),
    })
}

fn boolean(v: &Value, key: &str, what: &'static str) -> Result<bool, JsonError> {
    field(v, key, what)?
        .as_bool()
        .ok_or_else(|| JsonError::Shape {
            what,
            field: key.to_string(),
            problem: "is not a boolean".into(),
        })
}

fn text(v: &Value, key: &str, what: &'static str) -> Result<String, JsonError> {
    Ok(field(v, key, what)?
        .as_str()
        .unwrap_or_default()
        .to_string())
}

pub fn parse_preflight(v: &Value) -> Result<Preflight, JsonError> {
    const W: &str = "preflight";
    let items = as_list(v);
    let o = items.first().ok_or_else(|| JsonError::Shape {
        what: W,
        field: "result".into(),
        problem: "is empty".into(),
    })?;
    Ok(Preflight {
        user: text(o, "User", W)?,
        administrator: boolean(o, "Administrator", W)?,
        hyperv_administrators: boolean(o, "HyperVAdministrators", W)?,
        hyperv_module: boolean(o, "HyperVModule", W)?,
        vmms: text(o, "Vmms", W)?,
    })
}

impl Preflight {
    /// What stops `up`. `host_network`: the lab puts host addresses or a NAT on a switch
    /// (`New-NetIPAddress`/`New-NetNat` need an elevated shell, Hyper-V Administrators is not enough).
    pub fn problems(&self, host_network: bool) -> Vec<Problem> {
        let mut out = Vec::new();
        if !self.hyperv_module {
            out.push(Problem {
                problem: "the Hyper-V PowerShell module is not installed".into(),
                fix: "in an elevated PowerShell: Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V-All, then reboot".into(),
            });
        }
        if self.vmms != "Running" {
            out.push(Problem {
                problem: format!(
                    "the Hyper-V Virtual Machine Management service (vmms) is {}",
                    self.vmms
                ),
                fix: "in an elevated PowerShell: Start-Service vmms (enable Hyper-V first if it is Missing)".into(),
            });
        }
        if !self.administrator && !self.hyperv_administrators {
            out.push(Problem {
                problem: format!(
                    "{} is neither an administrator nor in Hyper-V Administrators",
                    self.user
                ),
                fix: format!(
                    "run klab from an elevated terminal, or in an elevated PowerShell: Add-LocalGroupMember -SID 'S-1-5-32-578' -Member {}, then sign out and in",
                    ps_quote(&self.user).unwrap_or_else(|_| "'<user>'".into())
                ),
            });
        } else if host_network && !self.administrator {
            out.push(Problem {
                problem: "the lab's switches need a host address (and nat a NetNat), which only an elevated shell may create".into(),
                fix: "run klab from an elevated terminal (from WSL2: open the WSL terminal with \"Run as administrator\")".into(),
            });
        }
        out
    }
}

/// Forwarding must be on for the WSL adapter and for every lab switch WSL2 has to reach.
pub fn forwarding_problems(
    v: &Value,
    switch_aliases: &[String],
) -> Result<Vec<Problem>, JsonError> {
    const W: &str = "Get-NetIPInterface";
    let mut seen = Vec::new();
    let mut off = Vec::new();
    for item in as_list(v) {
        let alias = text(item, "InterfaceAlias", W)?;
        let fwd = match field(item, "Forwarding", W)? {
            Value::Number(n) => if n.as_i64() == Some(1) {
                "Enabled"
            } else {
                "Disabled"
            }
            .to_string(),
            other => other.as_str().unwrap_or_default().to_string(),
        };
        if fwd != "Enabled" {
            off.push(alias.clone());
        }
        seen.push(alias);
    }
    let mut out = Vec::new();
    if !seen.iter().any(|a| a.starts_with("vEthernet (WSL")) {
        out.push(Problem {
            problem: "no vEthernet (WSL…) adapter: WSL2 is not in NAT mode, or not running".into(),
            fix: "start WSL2 in NAT networking mode (mirrored mode cannot reach other Hyper-V switches)".into(),
        });
    }
    for a in switch_aliases {
        if !seen.contains(a) {
            out.push(Problem {
                problem: format!("the host has no interface `{a}`"),
                fix: "run `klab up` first: the switch and its host address are made then".into(),
            });
        }
    }
    if !off.is_empty() {
        let cmds: Vec<String> = off
            .iter()
            .map(|a| {
                format!(
                    "Set-NetIPInterface -InterfaceAlias {} -Forwarding Enabled",
                    ps_quote(a).unwrap_or_default()
                )
            })
            .collect();
        out.push(Problem {
            problem: format!(
                "WSL2 cannot reach the lab: forwarding is off on {}",
                off.iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            fix: format!("in an elevated PowerShell: {}", cmds.join("; ")),
        });
    }
    Ok(out)
}

impl HyperVBackend {
    /// Rights and Hyper-V availability; an empty list means `up` may go ahead.
    pub fn preflight(&self, host_network: bool) -> Result<Vec<Problem>> {
        let script = self.script("check", "host", "rights", |t| t.ps_preflight())?;
        let v = self.run("check", "host", "rights", &script)?;
        let p = parse_preflight(&v).map_err(|e| BackendError::op("check", "host", "rights", e))?;
        Ok(p.problems(host_network))
    }

    /// From WSL2: can it reach the lab's Internal switches? (`klab doctor`.)
    pub fn wsl_forwarding(&self, switches: &[String]) -> Result<Vec<Problem>> {
        let aliases: Vec<String> = switches
            .iter()
            .map(|s| format!("vEthernet ({s})"))
            .collect();
        let script = self.script("check", "host", "forwarding", |t| {
            t.ps_wsl_forwarding(&aliases)
        })?;
        let v = self.run("check", "host", "forwarding", &script)?;
        forwarding_problems(&v, &aliases)
            .map_err(|e| BackendError::op("check", "host", "forwarding", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pre(admin: bool, hv: bool) -> Preflight {
        Preflight {
            user: "DESKTOP-1\\o'brien".into(),
            administrator: admin,
            hyperv_administrators: hv,
            hyperv_module: true,
            vmms: "Running".into(),
        }
    }

    #[test]
    fn rights_problems_name_the_fix() {
        assert_eq!(pre(true, false).problems(true), vec![]);
        assert_eq!(pre(false, true).problems(false), vec![]);
        assert_eq!(
            pre(false, false).problems(false),
            vec![Problem {
                problem: "DESKTOP-1\\o'brien is neither an administrator nor in Hyper-V Administrators".into(),
                fix: "run klab from an elevated terminal, or in an elevated PowerShell: Add-LocalGroupMember -SID 'S-1-5-32-578' -Member 'DESKTOP-1\\o''brien', then sign out and in".into(),
            }]
        );
        let p = pre(false, true).problems(true);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].fix,
            "run klab from an elevated terminal (from WSL2: open the WSL terminal with \"Run as administrator\")"
        );
        let mut none = pre(true, true);
        none.hyperv_module = false;
        none.vmms = "Missing".into();
        let p: Vec<String> = none
            .problems(false)
            .into_iter()
            .map(|p| p.problem)
            .collect();
        assert_eq!(
            p,
            [
                "the Hyper-V PowerShell module is not installed",
                "the Hyper-V Virtual Machine Management service (vmms) is Missing"
            ]
        );
    }

    #[test]
    fn preflight_parses_a_single_object() {
        let v = json!({"User": "DESKTOP-1\\me", "Administrator": false, "HyperVAdministrators": true, "HyperVModule": true, "Vmms": "Running"});
        assert_eq!(
            parse_preflight(&v).unwrap(),
            Preflight {
                user: "DESKTOP-1\\me".into(),
                administrator: false,
                hyperv_administrators: true,
                hyperv_module: true,
                vmms: "Running".into()
            }
        );
        assert_eq!(
            parse_preflight(&json!([{"User": "x"}]))
                .unwrap_err()
                .to_string(),
            "preflight: `Administrator` is missing"
        );
    }

    #[test]
    fn forwarding_off_gives_the_exact_commands() {
        let aliases = vec!["vEthernet (klab-seed000hv-internal)".to_string()];
        let v = json!([
            {"InterfaceAlias": "vEthernet (WSL (Hyper-V firewall))", "Forwarding": "Disabled"},
            {"InterfaceAlias": "vEthernet (klab-seed000hv-internal)", "Forwarding": 0}
        ]);
        assert_eq!(
            forwarding_problems(&v, &aliases).unwrap(),
            vec![Problem {
                problem: "WSL2 cannot reach the lab: forwarding is off on `vEthernet (WSL (Hyper-V firewall))`, `vEthernet (klab-seed000hv-internal)`".into(),
                fix: "in an elevated PowerShell: Set-NetIPInterface -InterfaceAlias 'vEthernet (WSL (Hyper-V firewall))' -Forwarding Enabled; Set-NetIPInterface -InterfaceAlias 'vEthernet (klab-seed000hv-internal)' -Forwarding Enabled".into(),
            }]
        );
        let ok = json!([
            {"InterfaceAlias": "vEthernet (WSL)", "Forwarding": 1},
            {"InterfaceAlias": "vEthernet (klab-seed000hv-internal)", "Forwarding": "Enabled"}
        ]);
        assert_eq!(forwarding_problems(&ok, &aliases).unwrap(), vec![]);
        let missing = forwarding_problems(&json!([]), &aliases).unwrap();
        let p: Vec<&str> = missing.iter().map(|p| p.problem.as_str()).collect();
        assert_eq!(
            p,
            [
                "no vEthernet (WSL…) adapter: WSL2 is not in NAT mode, or not running",
                "the host has no interface `vEthernet (klab-seed000hv-internal)`"
            ]
        );
    }
}
