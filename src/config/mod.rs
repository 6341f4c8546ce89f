//! Lab file loading and validation: `lab.toml` → [`crate::model::Lab`], or every error found,
//! each with file, line, column, field and a hint.
//!
//! Three passes over the text, all pure: TOML syntax (one error, it stops everything), unknown keys
//! (walked against the lab file's JSON Schema), then deserialization into [`raw`] and semantic
//! validation, which collects every error in one run.

mod diagnostic;
mod keys;
pub mod raw;
pub mod units;
mod validate;

use std::path::{Path, PathBuf};

pub use diagnostic::{Diagnostic, Diagnostics, escape, escape_keep_lines};

use crate::model::Lab;

/// The largest lab file klab reads. Real labs are a few KiB; the bound keeps `/dev/zero` or a
/// runaway generator from filling memory or hanging `validate`.
pub const MAX_LAB_FILE_BYTES: u64 = 1024 * 1024;

/// Reading a lab file from disk failed, or its content is not a valid lab.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read lab file {}", escape(&path.display().to_string()))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A directory, FIFO, socket or device: reading it could block or never end.
    #[error("lab file {} is not a regular file (it is {kind})", escape(&path.display().to_string()))]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "lab file {} is larger than {} KiB; klab reads at most that much",
        escape(&path.display().to_string()),
        MAX_LAB_FILE_BYTES / 1024
    )]
    TooLarge { path: PathBuf },
    /// Displays every diagnostic, one per line (with hints).
    #[error(transparent)]
    Invalid(#[from] Diagnostics),
}

impl LoadError {
    /// What the user can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            LoadError::Io { .. } => {
                "pass the lab file as an argument (default: ./lab.toml); examples are in labs/"
            }
            LoadError::NotAFile { .. } => {
                "pass a lab file (a regular file), e.g. lab.toml; `klab init` writes one"
            }
            LoadError::TooLarge { .. } => {
                "a lab file is a few KiB of TOML; is this the right file?"
            }
            LoadError::Invalid(_) => "fix the errors above",
        }
    }
}

/// Read and validate a lab file. Messages name the file as `path` is written. Only regular files
/// of at most [`MAX_LAB_FILE_BYTES`] are read.
pub fn load_file(path: &Path) -> Result<Lab, LoadError> {
    check_file(path).map(|c| c.lab)
}

/// The loader's I/O edge: one stat and one bounded read. A FIFO, device or directory is refused
/// before it is opened (opening a FIFO waits for a writer; `/dev/zero` never ends), and a regular
/// file is read through `take`, so a file that grows while it is read cannot pass the bound either.
fn read_bounded(path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Checked before opening: opening a FIFO blocks until a writer comes.
    let meta = path.metadata().map_err(io)?;
    if !meta.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "not a file"
        };
        return Err(LoadError::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    // io-edge: the loader's one file read; parse_bytes below is pure.
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    // One byte past the bound tells "too large" from "exactly at the bound".
    file.take(MAX_LAB_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_LAB_FILE_BYTES {
        return Err(LoadError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Parse and validate lab-file bytes: text that is not UTF-8 is one diagnostic at the first bad
/// byte. Pure (no I/O).
pub fn parse_bytes(bytes: &[u8], file: &str) -> Result<Lab, Diagnostics> {
    check_bytes(bytes, file).map(|c| c.lab)
}

/// [`parse_bytes`] with the warnings. Pure (no I/O).
pub fn check_bytes(bytes: &[u8], file: &str) -> Result<Checked, Diagnostics> {
    match std::str::from_utf8(bytes) {
        Ok(src) => check_str(src, file),
        Err(e) => {
            let good = &bytes[..e.valid_up_to()];
            // The prefix is valid UTF-8 by definition.
            let good = std::str::from_utf8(good).unwrap_or_default();
            let line = good.matches('\n').count() + 1;
            let col = good.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            let bad = bytes
                .get(e.valid_up_to())
                .map(|b| format!(" (byte 0x{b:02x})"))
                .unwrap_or_default();
            Err(Diagnostics(vec![Diagnostic {
                file: file.to_string(),
                line,
                col,
                field: String::new(),
                message: format!("not UTF-8{bad}"),
                hint: Some(
                    "a lab file is UTF-8 text; convert it, e.g. `iconv -f latin1 -t utf-8`".into(),
                ),
            }]))
        }
    }
}

/// A valid lab and the warnings found while checking it (an end-of-life Kubernetes minor …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub lab: Lab,
    /// Shown to the user as `warning: <file>:<line>:<col>: …`; they do not make the lab invalid.
    pub warnings: Vec<Diagnostic>,
}

/// Like [`load_file`], keeping the warnings. A relative `calico-manifest` is resolved against the
/// lab file's directory (as `path` is written: a relative lab path gives a path relative to the
/// working directory, like the lab path itself).
pub fn check_file(path: &Path) -> Result<Checked, LoadError> {
    let bytes = read_bounded(path)?;
    let mut checked = check_bytes(&bytes, &path.display().to_string())?;
    let dir = path.parent().unwrap_or(Path::new(""));
    if let Some(k) = checked.lab.kubernetes.as_mut()
        && let Some(m) = k.calico_manifest.take()
    {
        k.calico_manifest = Some(resolve_against(dir, &m));
    }
    Ok(checked)
}

/// `p` when absolute, else `dir/p`. Pure: nothing is read, the path need not exist.
pub fn resolve_against(dir: &Path, p: &Path) -> std::path::PathBuf {
    dir.join(p)
}

/// Parse and validate lab-file text. `file` is the name used in messages. Pure (no I/O).
pub fn parse_str(src: &str, file: &str) -> Result<Lab, Diagnostics> {
    check_str(src, file).map(|c| c.lab)
}

/// [`parse_str`] with the warnings. Pure (no I/O).
pub fn check_str(src: &str, file: &str) -> Result<Checked, Diagnostics> {
    let mut ctx = validate::Ctx::new(src, file);
    let table = match toml::de::DeTable::parse(src) {
        Ok(t) => t,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let hint =
                bare_word(src, span.start).map(|w| format!("strings must be quoted: \"{w}\""));
            ctx.report(
                &span,
                "",
                format!("TOML syntax error: {}", e.message().trim_end()),
                hint,
            );
            return Err(finish(ctx.diags));
        }
    };
    // Built once: the schema is a constant of the program.
    static SCHEMA: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(schema_json);
    for u in keys::unknown_keys(table.get_ref(), &SCHEMA) {
        if let Some((message, hint)) = retired_key(&u.path, table.get_ref()) {
            ctx.report(&u.span, &u.path, message, Some(hint));
            continue;
        }
        let message = if u.owner.is_empty() {
            format!("unknown key `{}`", u.key)
        } else {
            format!("unknown key `{}` in {}", u.key, u.owner)
        };
        let hint = match &u.suggestion {
            Some(s) => format!("did you mean `{s}`?"),
            None if u.known.is_empty() => "remove it".to_string(),
            None => format!(
                "valid keys here: {}",
                u.known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        ctx.report(&u.span, &u.path, message, Some(hint));
        if let Some(s) = &u.suggestion {
            let parent = u.path[..u.path.len() - u.key.len()].trim_end_matches('.');
            ctx.suggested.insert(if parent.is_empty() {
                s.clone()
            } else {
                format!("{parent}.{s}")
            });
        }
    }
    let cfg: raw::LabConfig = match toml::from_str(src) {
        Ok(c) => c,
        Err(e) => {
            // A value of the wrong shape (a string where a table belongs): nothing below it can be
            // checked, so this is reported with the unknown keys and nothing else.
            let span = e.span().unwrap_or(0..0);
            ctx.report(&span, "", shape_message(e.message()), None);
            return Err(finish(ctx.diags));
        }
    };
    match validate::validate(&cfg, &mut ctx) {
        Some(lab) if ctx.diags.is_empty() => Ok(Checked {
            lab,
            warnings: ctx.warnings,
        }),
        _ => Err(finish(ctx.diags)),
    }
}

/// Keys klab used to accept, with what to do instead: clearer than "unknown key".
fn retired_key(path: &str, table: &toml::de::DeTable<'_>) -> Option<(String, String)> {
    match path {
        "host.pool" => {
            let pool = match table.get("name").map(|n| n.get_ref()) {
                Some(toml::de::DeValue::String(n)) if units::is_lab_name(n) => {
                    format!("`klab-{n}`")
                }
                _ => "`klab-<name>`".to_string(),
            };
            Some((
                "[host] `pool` is no longer supported".to_string(),
                format!(
                    "remove it; klab makes a storage pool per lab ({pool}) and `klab down` removes it"
                ),
            ))
        }
        _ => None,
    }
}

/// The unquoted word a syntax error points at, when it follows `=` (`mode = nat`).
fn bare_word(src: &str, at: usize) -> Option<&str> {
    let rest = src.get(at..)?;
    let len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/')))
        .unwrap_or(rest.len());
    let word = &rest[..len];
    let before = src.get(..at)?.trim_end_matches([' ', '\t']);
    let starts_alpha = word.starts_with(|c: char| c.is_ascii_alphabetic());
    let keyword = matches!(word, "true" | "false" | "inf" | "nan");
    (before.ends_with('=') && starts_alpha && !keyword).then_some(word)
}

/// serde's wording (`expected struct NicConfig`) in the lab file's terms.
fn shape_message(msg: &str) -> String {
    let msg = msg.trim_end();
    let mut out = msg
        .strip_prefix("invalid type: ")
        .unwrap_or(msg)
        .to_string();
    if let Some(pos) = out.find("expected struct ") {
        out.replace_range(pos.., "expected a table");
    }
    format!("wrong type: {out}")
}

fn finish(mut diags: Vec<Diagnostic>) -> Diagnostics {
    // Stable: errors at the same position keep the order they were found in.
    diags.sort_by_key(|d| (d.line, d.col));
    diags.dedup();
    Diagnostics(diags)
}

/// JSON Schema (draft 2020-12) of the lab file, for editors and `klab schema`.
pub fn schema_json() -> serde_json::Value {
    let mut v = schemars::schema_for!(raw::LabConfig).to_value();
    drop_null(&mut v);
    v
}

/// TOML has no null (a value is left out by leaving out its key), so the `null` alternatives
/// schemars adds for `Option` fields would only mislead editors.
fn drop_null(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(alts)) = map.get_mut("anyOf") {
                alts.retain(|a| a.get("type").is_none_or(|t| t != "null"));
                if alts.len() == 1 {
                    let only = alts.remove(0);
                    map.remove("anyOf");
                    if let Value::Object(inner) = only {
                        for (k, val) in inner {
                            map.entry(k).or_insert(val);
                        }
                    }
                }
            }
            map.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
name = "t"
[networks.net]
mode = "isolated"
cidr = "10.1.0.0/24"
[[nodes]]
name = "a"
nics = [ { network = "net" } ]
"#;

    #[test]
    fn minimal_lab_gets_defaults() {
        let lab = parse_str(MIN, "lab.toml").unwrap();
        assert_eq!(lab.name, "t");
        let n = &lab.nodes[0];
        assert_eq!(n.cpus, crate::model::defaults::CPUS);
        assert_eq!(n.memory_mib, crate::model::defaults::MEMORY_MIB);
        assert_eq!(n.image, crate::model::defaults::IMAGE);
        assert_eq!(n.nics[0].ip.to_string(), "10.1.0.2");
        assert_eq!(lab.networks[0].gateway.to_string(), "10.1.0.1");
        assert!(lab.images.contains_key("debian-12"));
        assert!(lab.kubernetes.is_none());
    }

    fn lab_file(name: &str) -> Lab {
        let path = format!("{}/labs/{name}", env!("CARGO_MANIFEST_DIR"));
        load_file(Path::new(&path)).unwrap()
    }

    fn ips(lab: &Lab, network: &str) -> Vec<(String, String)> {
        lab.nodes
            .iter()
            .flat_map(|n| {
                n.nics
                    .iter()
                    .filter(|c| c.network == network)
                    .map(|c| (n.name.clone(), c.ip.to_string()))
            })
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn quickstart_addresses_match_its_comments() {
        let lab = lab_file("quickstart.toml");
        assert_eq!(
            ips(&lab, "outside"),
            pairs(&[("cp1", "192.168.150.10"), ("w1", "192.168.150.2")])
        );
        assert_eq!(
            ips(&lab, "cluster"),
            pairs(&[("cp1", "10.10.1.10"), ("w1", "10.10.1.2")])
        );
        let plain = lab_file("plain-vms.toml");
        assert_eq!(
            ips(&plain, "backend"),
            pairs(&[
                ("web1", "10.20.0.2"),
                ("web2", "10.20.0.3"),
                ("db", "10.20.0.100")
            ])
        );
        assert_eq!(plain.network("backend").unwrap().mtu, Some(1450));
    }

    #[test]
    fn seed_000_matches_the_write_up() {
        let lab = lab_file("seed-000-kubespray-hyperv.toml");
        assert_eq!(
            ips(&lab, "internal"),
            pairs(&[
                ("alma1", "10.10.1.10"),
                ("alma-w1", "10.10.1.11"),
                ("alma-w2", "10.10.1.12")
            ])
        );
        let cp = lab.node("alma1").unwrap();
        assert_eq!((cp.cpus, cp.memory_mib, cp.disk_gib), (2, 4096, 20));
        assert_eq!(lab.node("alma-w2").unwrap().memory_mib, 2048);
        assert_eq!(
            lab.images["almalinux-9"].family,
            crate::model::OsFamily::Alma
        );
        let k = lab.kubernetes.as_ref().unwrap();
        assert_eq!(
            (k.version.as_str(), k.service_cidr.to_string()),
            ("1.36", "10.233.0.0/18".into())
        );
        // NIC 1 (the default route) is the NAT network.
        assert!(lab.nodes.iter().all(|n| n.nics[0].network == "outside"));
    }

    #[test]
    fn seed_001_has_three_control_planes_behind_a_vip() {
        let lab = lab_file("seed-001-ha.toml");
        let cps: Vec<&str> = lab
            .nodes
            .iter()
            .filter(|n| n.role == crate::model::Role::ControlPlane)
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(cps, ["master01", "master02", "master03"]);
        assert_eq!(lab.nodes.len(), 7);
        let k = lab.kubernetes.as_ref().unwrap();
        assert_eq!(k.control_plane_vip, Some("192.168.3.10".parse().unwrap()));
        assert_eq!(k.pod_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(k.calico_version, crate::model::defaults::CALICO_VERSION);
    }

    #[test]
    fn backend_defaults_to_libvirt_and_hyperv_lab_selects_hyperv() {
        use crate::model::BackendKind;
        assert_eq!(lab_file("local.toml").host.backend, BackendKind::Libvirt);
        let lab = lab_file("seed-000-hyperv.toml");
        assert_eq!(lab.host.backend, BackendKind::Hyperv);
        assert_eq!(lab.host.backend.as_str(), "hyperv");
        let ips: Vec<String> = lab.nodes.iter().map(|n| n.nics[1].ip.to_string()).collect();
        assert_eq!(ips, ["10.10.1.10", "10.10.1.11", "10.10.1.12"]);
    }

    #[test]
    fn hyperv_bridge_takes_windows_adapter_names() {
        let src = "name = \"t\"\n[host]\nbackend = \"hyperv\"\n[networks.lan]\nmode = \"bridge\"\nbridge = \"vEthernet (Wi-Fi 2)\"\ncidr = \"192.168.1.0/24\"\ngateway = \"192.168.1.1\"\n[[nodes]]\nname = \"a\"\nnics = [ { network = \"lan\", ip = \"192.168.1.20\" } ]\n";
        let lab = parse_str(src, "t.toml").unwrap();
        assert_eq!(
            lab.networks[0].bridge.as_deref(),
            Some("vEthernet (Wi-Fi 2)")
        );
        // The same name on libvirt is not a Linux interface name.
        let libvirt = src.replace("backend = \"hyperv\"", "backend = \"libvirt\"");
        let err = parse_str(&libvirt, "t.toml").unwrap_err().to_string();
        assert!(err.contains("is not a valid interface name"), "{err}");
    }

    #[test]
    fn e2e_lab_is_small_plain_and_isolated() {
        let lab = lab_file("e2e-isolated.toml");
        assert_eq!(lab.host.accel, crate::model::Accel::Qemu);
        assert!(lab.kubernetes.is_none());
        assert!(
            lab.networks
                .iter()
                .all(|n| n.mode == crate::model::NetworkMode::Isolated)
        );
        assert_eq!(
            ips(&lab, "net1"),
            pairs(&[
                ("vm1", "10.231.1.11"),
                ("vm2", "10.231.1.12"),
                ("vm3", "10.231.1.13")
            ])
        );
        assert_eq!(
            ips(&lab, "net2"),
            pairs(&[
                ("vm1", "10.231.2.2"),
                ("vm2", "10.231.2.3"),
                ("vm3", "10.231.2.4")
            ])
        );
        assert!(
            lab.nodes
                .iter()
                .all(|n| n.cpus == 1 && n.memory_mib == 1024)
        );
        assert_eq!(lab.timeouts.ssh, std::time::Duration::from_secs(12 * 60));
    }

    #[test]
    fn bridge_lab_keeps_bridge_gateway_and_dns() {
        let lab = lab_file("seed-004-bridge.toml");
        let lan = lab.network("lan").unwrap();
        assert_eq!(lan.bridge.as_deref(), Some("br0"));
        assert_eq!(lan.gateway.to_string(), "192.168.182.1");
        assert_eq!(
            lan.dns,
            vec!["192.168.182.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            lab.kubernetes.as_ref().unwrap().cluster_network,
            "kube-isolated"
        );
    }

    /// A one-node Kubernetes lab with `extra` appended to its `[kubernetes]` section.
    fn k8s_lab(version: &str, extra: &str) -> String {
        format!(
            "name = \"t\"\n[networks.c]\nmode = \"isolated\"\ncidr = \"10.1.0.0/24\"\n\
             [[nodes]]\nname = \"cp\"\nrole = \"control-plane\"\nnics = [ {{ network = \"c\" }} ]\n\
             [kubernetes]\nversion = \"{version}\"\ncluster-network = \"c\"\n{extra}"
        )
    }

    #[test]
    fn provisioner_keys_are_read_with_defaults() {
        let c = check_str(&k8s_lab("1.36.4", ""), "t.toml").unwrap();
        assert!(c.warnings.is_empty());
        let k = c.lab.kubernetes.unwrap();
        assert_eq!(k.version, "1.36.4");
        assert_eq!(k.calico_version, "3.32.1");
        assert_eq!(k.encapsulation, crate::model::Encapsulation::Vxlan);
        assert_eq!(
            (
                k.package_repo,
                k.package_key,
                k.image_repository,
                k.calico_manifest
            ),
            (None, None, None, None)
        );

        let extra = r#"package-repo = "http://10.1.0.1:8080/k8s/"
package-key = "http://10.1.0.1:8080/k8s/Release.key"
image-repository = "registry.lab:5000/k8s"
encapsulation = "ipip"
calico-version = "3.31.7"
calico-manifest = "calico/calico.yaml"
"#;
        let k = parse_str(&k8s_lab("1.37", extra), "t.toml")
            .unwrap()
            .kubernetes
            .unwrap();
        assert_eq!(k.package_repo.as_deref(), Some("http://10.1.0.1:8080/k8s"));
        assert_eq!(
            k.package_key.as_deref(),
            Some("http://10.1.0.1:8080/k8s/Release.key")
        );
        assert_eq!(k.image_repository.as_deref(), Some("registry.lab:5000/k8s"));
        assert_eq!(k.encapsulation, crate::model::Encapsulation::Ipip);
        assert_eq!(k.calico_version, "3.31.7");
        assert_eq!(
            k.calico_manifest,
            Some(std::path::PathBuf::from("calico/calico.yaml"))
        );
        // With its own manifest a lab may name any Calico release.
        let own = "calico-version = \"3.30.2\"\ncalico-manifest = \"/srv/calico.yaml\"\n";
        assert!(parse_str(&k8s_lab("1.36", own), "t.toml").is_ok());
    }

    #[test]
    fn end_of_life_and_newer_minors_are_warnings() {
        let c = check_str(&k8s_lab("1.32", ""), "t.toml").unwrap();
        let shown: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            shown,
            [
                "t.toml:10:11: [kubernetes] version 1.32 is past its end of life\n  \
              hint: it still builds, but gets no fixes; supported minors are 1.35, 1.36 and 1.37, e.g. version = \"1.36\""
            ]
        );
        assert_eq!(c.lab.kubernetes.unwrap().version, "1.32");
        let c = check_str(&k8s_lab("1.38", ""), "t.toml").unwrap();
        assert_eq!(
            c.warnings[0].message,
            "[kubernetes] version 1.38 is newer than klab has been checked against"
        );
        assert_eq!(c.warnings[0].field, "kubernetes.version");
        let err = parse_str(&k8s_lab("1.30.2", ""), "t.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.toml:10:11: [kubernetes] version 1.30.2 is not supported\n  \
             hint: klab configures kubeadm with its v1beta4 API, which needs 1.31 or newer; supported minors are 1.35, 1.36 and 1.37, e.g. version = \"1.36\""
        );
    }

    #[test]
    fn automatic_addresses_skip_gateway_vip_and_fixed_ones() {
        let src = r#"
name = "t"
[networks.c]
mode = "isolated"
cidr = "10.1.0.0/24"
gateway = "10.1.0.3"
[[nodes]]
name = "cp"
count = 3
role = "control-plane"
nics = [ { network = "c" } ]
[[nodes]]
name = "w1"
role = "worker"
nics = [ { network = "c", ip = "10.1.0.4" } ]
[[nodes]]
name = "w2"
role = "worker"
nics = [ { network = "c" } ]
[kubernetes]
version = "1.32"
cluster-network = "c"
control-plane-vip = "10.1.0.2"
"#;
        let lab = parse_str(src, "t.toml").unwrap();
        assert_eq!(
            ips(&lab, "c"),
            pairs(&[
                ("cp1", "10.1.0.1"),
                ("cp2", "10.1.0.5"),
                ("cp3", "10.1.0.6"),
                ("w1", "10.1.0.4"),
                ("w2", "10.1.0.7"),
            ])
        );
        assert_eq!(parse_str(src, "t.toml").unwrap(), lab, "deterministic");
    }

    #[test]
    fn custom_images_and_catalog_override() {
        let src = format!(
            "{MIN}image = \"local\"\n{}",
            r#"
[[nodes]]
name = "b"
image = "debian-12"
nics = [ { network = "net" } ]
[images.local]
path = "/var/lib/klab/images/local.qcow2"
family = "alma"
kernel = "/var/lib/klab/images/vmlinuz"
initrd = "/var/lib/klab/images/initrd.img"
cmdline = "root=/dev/vda rw console=ttyS0"
[images.debian-12]
url = "https://mirror.example/debian.qcow2"
sha256 = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
[images.unused]
path = "/x.qcow2"
"#
        );
        let lab = parse_str(&src, "t.toml").unwrap();
        assert_eq!(lab.nodes[0].image, "local");
        assert_eq!(
            lab.images.keys().collect::<Vec<_>>(),
            ["debian-12", "local"]
        );
        let local = &lab.images["local"];
        assert_eq!(local.family, crate::model::OsFamily::Alma);
        assert_eq!(
            local.kernel.as_deref(),
            Some(Path::new("/var/lib/klab/images/vmlinuz"))
        );
        assert_eq!(
            local.cmdline.as_deref(),
            Some("root=/dev/vda rw console=ttyS0")
        );
        assert_eq!(
            lab.images["debian-12"].source,
            crate::model::ImageSource::Url {
                url: "https://mirror.example/debian.qcow2".into(),
                sha256: "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789".into()
            }
        );
    }

    #[test]
    fn calico_manifest_is_resolved_against_the_lab_files_directory() {
        assert_eq!(
            resolve_against(Path::new("labs/room"), Path::new("calico/calico.yaml")),
            Path::new("labs/room/calico/calico.yaml")
        );
        assert_eq!(
            resolve_against(Path::new("labs/room"), Path::new("/srv/calico.yaml")),
            Path::new("/srv/calico.yaml")
        );
        assert_eq!(
            resolve_against(Path::new(""), Path::new("calico.yaml")),
            Path::new("calico.yaml")
        );
    }

    #[test]
    fn load_file_reports_io_errors_with_the_path() {
        let e = load_file(Path::new("/nonexistent/lab.toml")).unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }));
        assert_eq!(e.to_string(), "cannot read lab file /nonexistent/lab.toml");
    }

    #[test]
    fn diagnostics_are_sorted_by_position() {
        let src = "name = \"t\"\n[[nodes]]\nname = \"B\"\ncpus = 0\nnics = [ { network = \"x\" } ]\n[host]\naccel = \"fast\"\n";
        let e = parse_str(src, "t.toml").unwrap_err();
        let pos: Vec<(usize, usize)> = e.0.iter().map(|d| (d.line, d.col)).collect();
        let mut sorted = pos.clone();
        sorted.sort();
        assert_eq!(pos, sorted);
        assert_eq!(e.0.len(), 4, "{e}");
    }

    /// Truncated and mangled lab files must give diagnostics, never a panic.
    #[test]
    fn never_panics_on_mangled_input() {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut sources = Vec::new();
        for dir in ["labs", "tests/invalid"] {
            for entry in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    // Lossy: the corpus holds a lab that is not UTF-8 on purpose.
                    let bytes = std::fs::read(path).unwrap();
                    sources.push(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
        }
        let mut runs = 0;
        for src in &sources {
            for (i, _) in src.char_indices().step_by(5) {
                let _ = parse_str(&src[..i], "cut.toml");
                let mut swapped = src.clone();
                swapped.replace_range(i..i, "\"");
                let _ = parse_str(&swapped, "quote.toml");
                runs += 2;
            }
        }
        assert!(runs > 1000);
    }

    #[test]
    fn bytes_that_are_not_utf8_are_one_diagnostic_at_the_first_bad_byte() {
        let e = parse_bytes(b"name = \"t\"\n\nx = \"ab\xffc\"\n\xfe", "x.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.toml:3:8: not UTF-8 (byte 0xff)\n  hint: a lab file is UTF-8 text; convert it, e.g. `iconv -f latin1 -t utf-8`"
        );
        // Columns count characters, as everywhere else.
        let e = parse_bytes(b"\xc3\xa9 = \xc3", "x.toml").unwrap_err();
        assert_eq!((e.0[0].line, e.0[0].col), (1, 5));
        assert_eq!(parse_bytes(MIN.as_bytes(), "x.toml").unwrap().name, "t");
    }

    #[test]
    fn syntax_error_is_one_diagnostic() {
        let e = parse_str("name = \n", "x.toml").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!((e.0[0].line, e.0[0].col), (1, 8));
        assert!(e.0[0].message.starts_with("TOML syntax error"), "{e}");
    }

    #[test]
    fn shape_error_keeps_unknown_keys() {
        let e = parse_str("name = \"t\"\nnodez = 1\nnodes = 3\n", "x.toml").unwrap_err();
        let lines: Vec<usize> = e.0.iter().map(|d| d.line).collect();
        assert_eq!(lines, vec![2, 3], "{e}");
    }

    #[test]
    fn schema_describes_the_file() {
        let s = schema_json();
        let props = s["properties"].as_object().unwrap();
        for k in [
            "name",
            "host",
            "defaults",
            "images",
            "networks",
            "nodes",
            "kubernetes",
            "timeouts",
        ] {
            assert!(props.contains_key(k), "{k}");
        }
        assert_eq!(s["additionalProperties"], serde_json::Value::Bool(false));
        assert!(s["required"].as_array().unwrap().contains(&"name".into()));
        let node = &s["$defs"]["NodeConfig"]["properties"];
        assert_eq!(node["cpus"]["type"], "integer");
        assert_eq!(node["cpus"]["minimum"], 1);
        assert_eq!(node["count"]["maximum"], 512, "validate::MAX_NODES");
        assert_eq!(node["role"]["$ref"], "#/$defs/RoleName");
        assert!(!s.to_string().contains("null"), "TOML has no null");
        assert_eq!(
            s["$defs"]["NetworkConfig"]["required"],
            serde_json::json!(["mode", "cidr"])
        );
    }

    #[test]
    fn every_lab_in_labs_validates() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/labs");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let src = std::fs::read_to_string(&path).unwrap();
                if let Err(e) = parse_str(&src, &path.display().to_string()) {
                    panic!("{e}");
                }
                n += 1;
            }
        }
        assert!(n >= 6, "expected the example labs, found {n}");
    }
}
