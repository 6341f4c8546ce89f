//! Reading cmdlet output (`Get-VM`, `Get-VMSwitch`, `Get-NetNat`, `Get-NetIPAddress`,
//! `Get-VMNetworkAdapter`, as `ConvertTo-Json` prints it) with Windows PowerShell 5.1's quirks:
//! one object where an array was expected, enums as integers (or strings from klab's scripts and
//! PowerShell 7), and nested objects cut into `"@{…}"` / type-name strings past `-Depth`.

use serde_json::{Map, Value};

use crate::observed::{DomainState, OwnerTag};
use crate::render::powershell::SwitchType;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error(
        "{what}: `{field}` is the string {shown:?} where an object was expected: the JSON was cut at \
         ConvertTo-Json's depth limit (Windows PowerShell 5.1 defaults to -Depth 2; klab's scripts use -Depth 8)"
    )]
    Truncated {
        what: &'static str,
        field: String,
        shown: String,
    },
    #[error("{what}: `{field}` {problem}")]
    Shape {
        what: &'static str,
        field: String,
        problem: String,
    },
}

fn shape(what: &'static str, field: impl Into<String>, problem: impl Into<String>) -> JsonError {
    JsonError::Shape {
        what,
        field: field.into(),
        problem: problem.into(),
    }
}

/// What 5.1 leaves of an object past the depth limit: `@{Name=…}` (a PSCustomObject) or a .NET
/// type name (`Microsoft.HyperV.PowerShell.HardDiskDrive`).
fn looks_truncated(s: &str) -> bool {
    s.starts_with("@{") || s.starts_with("Microsoft.") || s.starts_with("System.")
}

fn shown(s: &str) -> String {
    let mut t: String = s.chars().take(60).collect();
    if s.chars().count() > 60 {
        t.push('…');
    }
    t
}

/// One object or an array of them (or null = none): always a list.
pub fn as_list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

fn object<'a>(
    v: &'a Value,
    what: &'static str,
    field: &str,
) -> Result<&'a Map<String, Value>, JsonError> {
    match v {
        Value::Object(m) => Ok(m),
        Value::String(s) if looks_truncated(s) => Err(JsonError::Truncated {
            what,
            field: field.to_string(),
            shown: shown(s),
        }),
        other => Err(shape(
            what,
            field,
            format!("is {} where an object was expected", kind(other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string(m: &Map<String, Value>, what: &'static str, key: &str) -> Result<String, JsonError> {
    match m.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(shape(
            what,
            key,
            format!("is {} where a string was expected", kind(other)),
        )),
        None => Err(shape(what, key, "is missing")),
    }
}

/// A string field that may be absent or null (Notes of an old VM).
fn opt_string(m: &Map<String, Value>, what: &'static str, key: &str) -> Result<String, JsonError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(_) => string(m, what, key),
    }
}

/// Paths of a drive list: strings (klab's scripts) or drive objects with `Path` (raw cmdlets).
fn paths(m: &Map<String, Value>, what: &'static str, key: &str) -> Result<Vec<String>, JsonError> {
    let mut out = Vec::new();
    for (i, d) in m
        .get(key)
        .map(as_list)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let field = format!("{key}[{i}]");
        match d {
            Value::String(s) if looks_truncated(s) => {
                return Err(JsonError::Truncated {
                    what,
                    field,
                    shown: shown(s),
                });
            }
            Value::String(s) => out.push(s.clone()),
            Value::Null => {}
            other => {
                let o = object(other, what, &field)?;
                match o.get("Path") {
                    Some(Value::String(p)) => out.push(p.clone()),
                    // An empty DVD drive.
                    None | Some(Value::Null) => {}
                    Some(x) => {
                        return Err(shape(
                            what,
                            format!("{field}.Path"),
                            format!("is {} where a string was expected", kind(x)),
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// An enum as 5.1 prints it (a number) or as a string.
enum EnumValue<'a> {
    Int(i64),
    Name(&'a str),
}

fn enum_value<'a>(
    m: &'a Map<String, Value>,
    what: &'static str,
    key: &str,
) -> Result<EnumValue<'a>, JsonError> {
    match m.get(key) {
        Some(Value::Number(n)) => n
            .as_i64()
            .map(EnumValue::Int)
            .ok_or_else(|| shape(what, key, format!("is the number {n}, not an enum value"))),
        Some(Value::String(s)) => Ok(EnumValue::Name(s)),
        Some(other) => Err(shape(
            what,
            key,
            format!("is {} where an enum was expected", kind(other)),
        )),
        None => Err(shape(what, key, "is missing")),
    }
}

/// Hyper-V `VMState`: Running 2, Off 3, Stopping 4, Saved 6, Paused 9, Starting 10, …
pub fn vm_state_name(n: i64) -> &'static str {
    match n {
        1 => "Other",
        2 => "Running",
        3 => "Off",
        4 => "Stopping",
        6 => "Saved",
        9 => "Paused",
        10 => "Starting",
        11 => "Reset",
        32773 => "Saving",
        32776 => "Pausing",
        32777 => "Resuming",
        32779 => "FastSaved",
        32780 => "FastSaving",
        32781 => "RunningCritical",
        32782 => "OffCritical",
        32783 => "StoppingCritical",
        32784 => "SavedCritical",
        32785 => "PausedCritical",
        _ => "Unknown",
    }
}

/// What the reconciler sees: running, paused, or off (Saved resumes with `Start-VM`, like off).
pub fn domain_state(name: &str) -> DomainState {
    match name {
        "Running" | "RunningCritical" => DomainState::Running,
        "Paused" | "PausedCritical" => DomainState::Paused,
        "Off" | "OffCritical" | "Saved" | "SavedCritical" | "FastSaved" => DomainState::Shutoff,
        _ => DomainState::Other,
    }
}

/// The klab tag in a Notes field: `klab:lab=<lab>` plus ` node=<node>` on VMs.
pub fn owner_from_notes(notes: &str) -> Option<OwnerTag> {
    let mut words = notes.split_whitespace();
    let lab = words.by_ref().find_map(|w| w.strip_prefix("klab:lab="))?;
    if lab.is_empty() {
        return None;
    }
    let node = words
        .next()
        .and_then(|w| w.strip_prefix("node="))
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    Some(OwnerTag {
        lab: lab.to_string(),
        node,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    /// Hyper-V's own state name (`Running`, `Off`, …).
    pub state: String,
    pub notes: String,
    pub hard_drives: Vec<String>,
    pub dvd_drives: Vec<String>,
    /// From klab's observe script (absent in plain `Get-VM` output).
    pub adapters: Vec<AdapterInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchInfo {
    pub name: String,
    pub switch_type: SwitchType,
    pub notes: String,
    pub adapter_description: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatInfo {
    pub name: String,
    /// `192.168.160.0/24`.
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpInfo {
    pub alias: String,
    pub ip: String,
    pub prefix_length: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    pub vm_name: String,
    pub name: String,
    pub switch_name: Option<String>,
    /// 12 hex digits as Hyper-V reports them.
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    pub path: String,
    pub files: Vec<String>,
}

pub fn parse_vms(v: &Value) -> Result<Vec<VmInfo>, JsonError> {
    const W: &str = "Get-VM";
    as_list(v)
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let m = object(item, W, &format!("[{i}]"))?;
            let state = match enum_value(m, W, "State")? {
                EnumValue::Int(n) => vm_state_name(n).to_string(),
                EnumValue::Name(s) => s.to_string(),
            };
            Ok(VmInfo {
                name: string(m, W, "Name")?,
                state,
                notes: opt_string(m, W, "Notes")?,
                hard_drives: paths(m, W, "HardDrives")?,
                // klab's scripts say `DvdDrives`; raw `Get-VM | ConvertTo-Json` says `DVDDrives`.
                dvd_drives: if m.contains_key("DvdDrives") {
                    paths(m, W, "DvdDrives")?
                } else {
                    paths(m, W, "DVDDrives")?
                },
                adapters: match m.get("NetworkAdapters") {
                    Some(a) => parse_adapters(a)?,
                    None => Vec::new(),
                },
            })
        })
        .collect()
}

pub fn parse_switches(v: &Value) -> Result<Vec<SwitchInfo>, JsonError> {
    const W: &str = "Get-VMSwitch";
    as_list(v)
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let m = object(item, W, &format!("[{i}]"))?;
            let switch_type = match enum_value(m, W, "SwitchType")? {
                EnumValue::Int(0) | EnumValue::Name("Private") => SwitchType::Private,
                EnumValue::Int(1) | EnumValue::Name("Internal") => SwitchType::Internal,
                EnumValue::Int(2) | EnumValue::Name("External") => SwitchType::External,
                EnumValue::Int(n) => {
                    return Err(shape(W, "SwitchType", format!("{n} is not a switch type")));
                }
                EnumValue::Name(s) => {
                    return Err(shape(
                        W,
                        "SwitchType",
                        format!("`{s}` is not a switch type"),
                    ));
                }
            };
            Ok(SwitchInfo {
                name: string(m, W, "Name")?,
                switch_type,
                notes: opt_string(m, W, "Notes")?,
                adapter_description: opt_string(m, W, "NetAdapterInterfaceDescription")?,
            })
        })
        .collect()
}

pub fn parse_nats(v: &Value) -> Result<Vec<NatInfo>, JsonError> {
    const W: &str = "Get-NetNat";
    as_list(v)
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let m = object(item, W, &format!("[{i}]"))?;
            Ok(NatInfo {
                name: string(m, W, "Name")?,
                prefix: opt_string(m, W, "InternalIPInterfaceAddressPrefix")?,
            })
        })
        .collect()
}

pub fn parse_ip_addresses(v: &Value) -> Result<Vec<IpInfo>, JsonError> {
    const W: &str = "Get-NetIPAddress";
    as_list(v)
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let m = object(item, W, &format!("[{i}]"))?;
            let prefix_length = match m.get("PrefixLength") {
                Some(Value::Number(n)) => n
                    .as_u64()
                    .filter(|p| *p <= 32)
                    .map(|p| p as u8)
                    .ok_or_else(|| {
                        shape(W, "PrefixLength", format!("{n} is not a prefix length"))
                    })?,
                Some(other) => {
                    return Err(shape(
                        W,
                        "PrefixLength",
                        format!("is {} where a number was expected", kind(other)),
                    ));
                }
                None => return Err(shape(W, "PrefixLength", "is missing")),
            };
            Ok(IpInfo {
                alias: string(m, W, "InterfaceAlias")?,
                ip: string(m, W, "IPAddress")?,
                prefix_length,
            })
        })
        .collect()
}

pub fn parse_adapters(v: &Value) -> Result<Vec<AdapterInfo>, JsonError> {
    const W: &str = "Get-VMNetworkAdapter";
    as_list(v)
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let m = object(item, W, &format!("[{i}]"))?;
            let switch_name = opt_string(m, W, "SwitchName")?;
            Ok(AdapterInfo {
                vm_name: string(m, W, "VMName")?,
                name: string(m, W, "Name")?,
                switch_name: (!switch_name.is_empty()).then_some(switch_name),
                mac: string(m, W, "MacAddress")?,
            })
        })
        .collect()
}

fn parse_pools(v: &Value) -> Result<Vec<PoolInfo>, JsonError> {
    const W: &str = "observe";
    as_list(v)
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let m = object(item, W, &format!("Pools[{i}]"))?;
            Ok(PoolInfo {
                name: string(m, W, "Name")?,
                path: string(m, W, "Path")?,
                files: paths(m, W, "Files")?,
            })
        })
        .collect()
}

/// The single object of a klab script's `@(…)` result.
fn single<'a>(v: &'a Value, what: &'static str) -> Result<&'a Map<String, Value>, JsonError> {
    let items = as_list(v);
    match items.as_slice() {
        [one] => object(one, what, "[0]"),
        other => Err(shape(
            what,
            "result",
            format!("holds {} items where one was expected", other.len()),
        )),
    }
}

/// `hyperv-observe.ps1`'s result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveDoc {
    pub vms: Vec<VmInfo>,
    pub switches: Vec<SwitchInfo>,
    pub pools: Vec<PoolInfo>,
}

pub fn parse_observe(v: &Value) -> Result<ObserveDoc, JsonError> {
    let m = single(v, "observe")?;
    let get = |k: &str| m.get(k).cloned().unwrap_or(Value::Null);
    Ok(ObserveDoc {
        vms: parse_vms(&get("VMs"))?,
        switches: parse_switches(&get("Switches"))?,
        pools: parse_pools(&get("Pools"))?,
    })
}

/// `hyperv-get-network.ps1`'s result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDoc {
    pub switches: Vec<SwitchInfo>,
    pub nats: Vec<NatInfo>,
    pub addresses: Vec<IpInfo>,
}

pub fn parse_network(v: &Value) -> Result<NetworkDoc, JsonError> {
    let m = single(v, "get-network")?;
    let get = |k: &str| m.get(k).cloned().unwrap_or(Value::Null);
    Ok(NetworkDoc {
        switches: parse_switches(&get("Switches"))?,
        nats: parse_nats(&get("Nats"))?,
        addresses: parse_ip_addresses(&get("Addresses"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn notes_tags() {
        assert_eq!(
            owner_from_notes("klab:lab=seed000hv node=alma1"),
            Some(OwnerTag {
                lab: "seed000hv".into(),
                node: Some("alma1".into())
            })
        );
        assert_eq!(
            owner_from_notes("made by hand\r\nklab:lab=x"),
            Some(OwnerTag {
                lab: "x".into(),
                node: None
            })
        );
        assert_eq!(owner_from_notes("klab-lab-alma1 by hand"), None);
        assert_eq!(owner_from_notes("klab:lab="), None);
    }

    #[test]
    fn states_by_number_and_name() {
        assert_eq!(vm_state_name(2), "Running");
        assert_eq!(vm_state_name(3), "Off");
        assert_eq!(vm_state_name(6), "Saved");
        assert_eq!(vm_state_name(9), "Paused");
        assert_eq!(vm_state_name(77), "Unknown");
        assert_eq!(domain_state("Running"), DomainState::Running);
        assert_eq!(domain_state("Saved"), DomainState::Shutoff);
        assert_eq!(domain_state("Starting"), DomainState::Other);
    }

    #[test]
    fn a_scalar_where_an_object_belongs_is_a_shape_error() {
        let e = parse_nats(&json!([42])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Get-NetNat: `[0]` is a number where an object was expected"
        );
        let e = parse_vms(&json!({"Name": "a"})).unwrap_err();
        assert_eq!(e.to_string(), "Get-VM: `State` is missing");
    }
}
