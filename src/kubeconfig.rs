//! Handing a lab's admin kubeconfig to the user: rename kubeadm's generic entries after the lab,
//! point it at a reachable API server, and merge it into (or remove it from) `~/.kube/config`.
//!
//! Pure text-to-text functions: the CLI reads and writes the files (0600), so this module stays
//! testable and cannot touch a user's config by accident. Kubeconfigs carry client keys, so the
//! texts this module returns are [`Secret`]s and its errors never quote their input.

use std::fmt;

use serde_norway::{Mapping, Value};

use crate::plan::secret::Secret;

/// Which text an error is about, so the user knows which file to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    /// kubeadm's `/etc/kubernetes/admin.conf` given to [`for_lab`].
    AdminConf,
    /// The config given to [`server`].
    Kubeconfig,
    /// The user's `~/.kube/config` given to [`merge`] or [`remove_lab`].
    Existing,
    /// The lab's config (output of [`for_lab`]) given to [`merge`].
    Lab,
}

impl fmt::Display for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AdminConf => "the cluster's admin.conf",
            Self::Kubeconfig => "the kubeconfig",
            Self::Existing => "the existing kubeconfig",
            Self::Lab => "the lab's kubeconfig",
        })
    }
}

/// Why a kubeconfig could not be built, merged or read.
///
/// Messages name documents, fields and positions only: the input holds private keys, so no value
/// from it may reach a terminal or a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeconfigError {
    #[error("{doc} is not a valid single YAML document{}", at(*.location))]
    NotYaml {
        doc: Document,
        /// Line and column (1-based) where the parser gave up, when it knows.
        location: Option<(usize, usize)>,
    },
    #[error("{doc} is not a kubeconfig: {reason}")]
    NotKubeconfig { doc: Document, reason: &'static str },
    #[error("{doc} must have exactly one entry in `{list}`, but has {found}")]
    NotSingle {
        doc: Document,
        list: &'static str,
        found: usize,
    },
    #[error("{doc} is not a usable kubeconfig: `{field}` is {problem}")]
    Field {
        doc: Document,
        /// Path built from key names and indices only (`clusters[0].cluster.server`).
        field: String,
        problem: &'static str,
    },
    #[error("{doc} has no current context naming one of its clusters, and more than one cluster")]
    NoCurrentCluster { doc: Document },
    #[error(
        "{doc} is inconsistent: its context does not point at its own cluster and user (was it made by klab?)"
    )]
    Inconsistent { doc: Document },
    #[error("the lab name is empty")]
    EmptyLab,
    #[error("the API server address given for the lab is not an https://HOST[:PORT] URL")]
    BadServer,
    #[error("cannot write the kubeconfig as YAML")]
    Serialize,
}

fn at(location: Option<(usize, usize)>) -> String {
    location.map_or_else(String::new, |(line, column)| {
        format!(" (line {line}, column {column})")
    })
}

/// For the private helpers; public signatures spell the error out for readers of the docs.
type Result<T> = std::result::Result<T, KubeconfigError>;

/// The three entry names a lab owns in a user's kubeconfig. Prefixed with `klab-` so they cannot
/// collide with a cloud provider's entries; the context is the bare lab name because that is what
/// people type in `kubectl --context`.
struct Names {
    cluster: String,
    user: String,
    context: String,
}

impl Names {
    fn of(lab: &str) -> Result<Self> {
        if lab.trim().is_empty() {
            return Err(KubeconfigError::EmptyLab);
        }
        Ok(Self {
            cluster: format!("klab-{lab}"),
            user: format!("klab-{lab}-admin"),
            context: lab.to_string(),
        })
    }
}

/// The lists a kubeconfig keeps its entries in, with the key holding each entry's body.
const LISTS: [(&str, &str); 3] = [
    ("clusters", "cluster"),
    ("users", "user"),
    ("contexts", "context"),
];

/// kubeadm's admin.conf rewritten for the user's machine: entries renamed after the lab (kubeadm
/// calls every cluster `kubernetes`, so two labs would otherwise overwrite each other on merge),
/// current context set to the lab, and the server replaced when `server` is given (kubeadm writes
/// the control plane's address, which the host may not reach, or a load balancer it cannot see).
///
/// Every other field (CA data, client certificate and key, `tls-server-name`, extensions) is kept
/// as is.
pub fn for_lab(
    admin_conf: &str,
    lab: &str,
    server: Option<&str>,
) -> std::result::Result<Secret, KubeconfigError> {
    let doc = Document::AdminConf;
    let names = Names::of(lab)?;
    if let Some(url) = server
        && host_port(url).is_none()
    {
        return Err(KubeconfigError::BadServer);
    }
    let mut root = config_root(parse(admin_conf, doc)?, doc, true)?;

    let cluster = single_entry_mut(&mut root, "clusters", "cluster", doc)?;
    set(cluster, "name", &names.cluster);
    let body = body_mut(cluster, "clusters", "cluster", doc)?;
    // Checked even when replaced: a cluster without a server is not what kubeadm writes.
    string_field(body, "server", "clusters[0].cluster.server", doc)?;
    if let Some(url) = server {
        set(body, "server", url);
    }

    let user = single_entry_mut(&mut root, "users", "user", doc)?;
    set(user, "name", &names.user);
    body_mut(user, "users", "user", doc)?;

    let context = single_entry_mut(&mut root, "contexts", "context", doc)?;
    set(context, "name", &names.context);
    // Re-pointed rather than checked: with one cluster and one user there is nothing else the
    // context could have meant.
    let body = body_mut(context, "contexts", "context", doc)?;
    set(body, "cluster", &names.cluster);
    set(body, "user", &names.user);

    set(&mut root, "current-context", &names.context);
    emit(root)
}

/// The API server URL of the cluster the config's current context uses, or of its only cluster;
/// for probing the API server or printing where the lab answers. Not key material, so a `String`.
pub fn server(config: &str) -> std::result::Result<String, KubeconfigError> {
    let doc = Document::Kubeconfig;
    let root = config_root(parse(config, doc)?, doc, false)?;
    let clusters = list(&root, "clusters", doc)?;
    let by_current = current_context(&root, doc)?
        .and_then(|current| find(list(&root, "contexts", doc).ok()?, current))
        .and_then(|(_, ctx)| ctx.get("context")?.get("cluster")?.as_str())
        .and_then(|name| find(clusters, name));
    let (index, entry) = match by_current {
        Some(found) => found,
        None if clusters.len() == 1 => (0, &clusters[0]),
        None => return Err(KubeconfigError::NoCurrentCluster { doc }),
    };
    let entry = entry.as_mapping().ok_or_else(|| KubeconfigError::Field {
        doc,
        field: format!("clusters[{index}]"),
        problem: "not a mapping",
    })?;
    let body = match entry.get("cluster") {
        Some(Value::Mapping(body)) => body,
        other => {
            return Err(field_error(
                doc,
                format!("clusters[{index}].cluster"),
                other,
            ));
        }
    };
    string_field(
        body,
        "server",
        &format!("clusters[{index}].cluster.server"),
        doc,
    )
    .map(str::to_string)
}

/// Host and port of an `https://HOST[:PORT][/path]` API server URL (port 443 when absent), for a
/// reachability probe. An IPv6 host is written in brackets in the URL and returned without them.
/// `None` for anything else: another scheme, user info, an empty host, a bad or zero port.
pub fn host_port(server_url: &str) -> Option<(String, u16)> {
    const SCHEME: &str = "https://";
    let scheme = server_url.get(..SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &server_url[SCHEME.len()..];
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return None;
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, tail) = bracketed.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match tail {
            "" => None,
            tail => Some(tail.strip_prefix(':')?),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let valid_host = !host.is_empty()
        && !host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '[' | ']'));
    if !valid_host {
        return None;
    }
    let port = match port {
        None => 443,
        // `u16::from_str` takes a leading `+`; a URL port is digits only.
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    (port != 0).then(|| (host.to_string(), port))
}

/// The user's kubeconfig with the lab's entries in it, as `kubectl config set-*` would leave it:
/// same-named entries replaced in place (a lab recreated with a new CA must not keep the stale
/// one, and in place so the user's file does not reshuffle), other entries kept in order, new ones
/// appended. `current-context` becomes the lab's when `set_current` or when there was none.
///
/// No existing file (or a blank one) gives a fresh config. A file that is not a kubeconfig is an
/// error, never overwritten: it may hold the user's only credentials for other clusters.
pub fn merge(
    existing: Option<&str>,
    lab_config: &str,
    set_current: bool,
) -> std::result::Result<Secret, KubeconfigError> {
    let lab = LabEntries::parse(lab_config)?;
    let mut root = match existing {
        Some(text) => existing_root(text)?.unwrap_or_else(fresh),
        None => fresh(),
    };
    for ((list_key, _), (name, entry)) in LISTS.iter().zip(lab.entries) {
        upsert(&mut root, list_key, &name, entry);
    }
    let has_current = current_context(&root, Document::Existing)?.is_some_and(|c| !c.is_empty());
    if set_current || !has_current {
        set(&mut root, "current-context", &lab.context);
    }
    emit(root)
}

/// The user's kubeconfig without the lab's cluster, user and context (for `klab down`), and
/// without `current-context` if it named the removed context, so kubectl does not point at a
/// cluster that is gone. `None` when none of the lab's entries were there: nothing to write.
///
/// A context named after the lab is removed only if it points at the lab's cluster or user: one
/// pointing elsewhere is the user's own, not klab's.
pub fn remove_lab(
    existing: &str,
    lab: &str,
) -> std::result::Result<Option<Secret>, KubeconfigError> {
    let names = Names::of(lab)?;
    let Some(mut root) = existing_root(existing)? else {
        return Ok(None);
    };
    let mut removed_any = false;
    let mut removed_context = false;
    for (list_key, body_key) in LISTS {
        let Some(Value::Sequence(seq)) = root.get_mut(list_key) else {
            continue;
        };
        let before = seq.len();
        seq.retain(|entry| {
            let owned = match body_key {
                "cluster" => name_of(entry) == Some(&names.cluster),
                "user" => name_of(entry) == Some(&names.user),
                _ => {
                    let points_at = |key: &str, name: &str| {
                        entry
                            .get("context")
                            .and_then(|c| c.get(key))
                            .and_then(Value::as_str)
                            == Some(name)
                    };
                    name_of(entry) == Some(&names.context)
                        && (points_at("cluster", &names.cluster) || points_at("user", &names.user))
                }
            };
            !owned
        });
        if seq.len() != before {
            removed_any = true;
            removed_context |= body_key == "context";
        }
    }
    if !removed_any {
        return Ok(None);
    }
    if removed_context
        && current_context(&root, Document::Existing)? == Some(names.context.as_str())
    {
        // Emptied rather than dropped, as `kubectl config unset current-context` leaves it.
        set(&mut root, "current-context", "");
    }
    emit(root).map(Some)
}

/// The lab config's three entries, checked to be one coherent set before anything is merged.
struct LabEntries {
    /// `(name, entry)` for clusters, users, contexts, in [`LISTS`] order.
    entries: [(String, Value); 3],
    context: String,
}

impl LabEntries {
    fn parse(text: &str) -> Result<Self> {
        let doc = Document::Lab;
        let mut root = config_root(parse(text, doc)?, doc, true)?;
        let mut take =
            |list_key: &'static str, body_key: &'static str| -> Result<(String, Value)> {
                let entry = single_entry_mut(&mut root, list_key, body_key, doc)?;
                body_mut(entry, list_key, body_key, doc)?;
                let name = string_field(entry, "name", &format!("{list_key}[0].name"), doc)?;
                if name.is_empty() {
                    return Err(KubeconfigError::Field {
                        doc,
                        field: format!("{list_key}[0].name"),
                        problem: "empty",
                    });
                }
                Ok((name.to_string(), Value::Mapping(entry.clone())))
            };
        let cluster = take("clusters", "cluster")?;
        let user = take("users", "user")?;
        let context = take("contexts", "context")?;
        let points_at = |key: &str, name: &str| {
            context
                .1
                .get("context")
                .and_then(|c| c.get(key))
                .and_then(Value::as_str)
                == Some(name)
        };
        // Merging a context that names some other cluster would hand the user a context that
        // silently talks to the wrong cluster.
        if !points_at("cluster", &cluster.0) || !points_at("user", &user.0) {
            return Err(KubeconfigError::Inconsistent { doc });
        }
        Ok(Self {
            context: context.0.clone(),
            entries: [cluster, user, context],
        })
    }
}

fn parse(text: &str, doc: Document) -> Result<Value> {
    serde_norway::from_str(text).map_err(|e| KubeconfigError::NotYaml {
        doc,
        // The parser's own message may quote the offending text: only its position is kept.
        location: e.location().map(|l| (l.line(), l.column())),
    })
}

/// The top-level mapping, checked to be a kubeconfig. `require_kind` is off for user files:
/// kubectl reads a hand-written config without `kind`, so klab must too.
fn config_root(value: Value, doc: Document, require_kind: bool) -> Result<Mapping> {
    let Value::Mapping(root) = value else {
        return Err(KubeconfigError::NotKubeconfig {
            doc,
            reason: "its top level is not a mapping",
        });
    };
    match root.get("kind") {
        Some(Value::String(kind)) if kind == "Config" => Ok(root),
        None | Some(Value::Null) if !require_kind => Ok(root),
        None | Some(Value::Null) => Err(KubeconfigError::NotKubeconfig {
            doc,
            reason: "it has no `kind: Config`",
        }),
        Some(_) => Err(KubeconfigError::NotKubeconfig {
            doc,
            reason: "its `kind` is not `Config`",
        }),
    }
}

/// The user's config checked deeply enough that merging cannot turn a malformed file into a
/// different malformed file; `None` when it is blank (only whitespace or comments).
fn existing_root(text: &str) -> Result<Option<Mapping>> {
    let doc = Document::Existing;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let value = parse(text, doc)?;
    if value.is_null() {
        return Ok(None);
    }
    let root = config_root(value, doc, false)?;
    for (list_key, _) in LISTS {
        for (i, entry) in list(&root, list_key, doc)?.iter().enumerate() {
            if !entry.is_mapping() {
                return Err(KubeconfigError::Field {
                    doc,
                    field: format!("{list_key}[{i}]"),
                    problem: "not a mapping",
                });
            }
        }
    }
    current_context(&root, doc)?;
    Ok(Some(with_header(root)))
}

/// What kubectl writes for a user without a config.
fn fresh() -> Mapping {
    let mut root = Mapping::new();
    set(&mut root, "apiVersion", "v1");
    set(&mut root, "kind", "Config");
    root.insert("preferences".into(), Value::Mapping(Mapping::new()));
    for (list_key, _) in LISTS {
        root.insert(list_key.into(), Value::Sequence(Vec::new()));
    }
    set(&mut root, "current-context", "");
    root
}

/// `apiVersion` and `kind` added first when a hand-written file lacks them, so the merged file
/// is a complete kubeconfig; a file that has them keeps its key order untouched.
fn with_header(root: Mapping) -> Mapping {
    if root.contains_key("apiVersion") && root.contains_key("kind") {
        return root;
    }
    let mut out = Mapping::new();
    let mut root = root;
    let api = root
        .shift_remove("apiVersion")
        .unwrap_or_else(|| "v1".into());
    let kind = root.shift_remove("kind").unwrap_or_else(|| "Config".into());
    out.insert("apiVersion".into(), api);
    out.insert("kind".into(), kind);
    out.extend(root);
    out
}

/// Entries of a list; absent or `null` (kubectl writes `users: null`) is empty.
fn list<'a>(root: &'a Mapping, list_key: &'static str, doc: Document) -> Result<&'a [Value]> {
    match root.get(list_key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Sequence(seq)) => Ok(seq),
        Some(_) => Err(KubeconfigError::Field {
            doc,
            field: list_key.to_string(),
            problem: "not a list",
        }),
    }
}

/// `current-context`, `None` when absent or `null`.
fn current_context(root: &Mapping, doc: Document) -> Result<Option<&str>> {
    match root.get("current-context") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(KubeconfigError::Field {
            doc,
            field: "current-context".to_string(),
            problem: "not a string",
        }),
    }
}

fn single_entry_mut<'a>(
    root: &'a mut Mapping,
    list_key: &'static str,
    body_key: &'static str,
    doc: Document,
) -> Result<&'a mut Mapping> {
    let found = list(root, list_key, doc)?.len();
    if found != 1 {
        return Err(KubeconfigError::NotSingle {
            doc,
            list: list_key,
            found,
        });
    }
    match root.get_mut(list_key).and_then(Value::as_sequence_mut) {
        Some(seq) => match &mut seq[0] {
            Value::Mapping(entry) => Ok(entry),
            _ => Err(KubeconfigError::Field {
                doc,
                field: format!("{list_key}[0]"),
                problem: "not a mapping",
            }),
        },
        None => Err(KubeconfigError::Field {
            doc,
            field: format!("{list_key}[0].{body_key}"),
            problem: "missing",
        }),
    }
}

fn body_mut<'a>(
    entry: &'a mut Mapping,
    list_key: &'static str,
    body_key: &'static str,
    doc: Document,
) -> Result<&'a mut Mapping> {
    match entry.get_mut(body_key) {
        Some(Value::Mapping(body)) => Ok(body),
        other => Err(field_error(
            doc,
            format!("{list_key}[0].{body_key}"),
            other.map(|v| &*v),
        )),
    }
}

fn string_field<'a>(map: &'a Mapping, key: &str, path: &str, doc: Document) -> Result<&'a str> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s),
        other => Err(KubeconfigError::Field {
            doc,
            field: path.to_string(),
            problem: if other.is_none_or(Value::is_null) {
                "missing"
            } else {
                "not a string"
            },
        }),
    }
}

fn field_error(doc: Document, field: String, found: Option<&Value>) -> KubeconfigError {
    KubeconfigError::Field {
        doc,
        field,
        problem: if found.is_none_or(Value::is_null) {
            "missing"
        } else {
            "not a mapping"
        },
    }
}

fn find<'a>(entries: &'a [Value], name: &str) -> Option<(usize, &'a Value)> {
    entries
        .iter()
        .enumerate()
        .find(|(_, e)| name_of(e) == Some(name))
}

fn name_of(entry: &Value) -> Option<&str> {
    entry.get("name")?.as_str()
}

/// Replaces the first entry named `name` in place, drops later duplicates (kubectl only ever
/// reads the first, so a leftover would be stale key material), or appends.
fn upsert(root: &mut Mapping, list_key: &str, name: &str, entry: Value) {
    let slot = root
        .entry(list_key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !slot.is_sequence() {
        // Only `null` gets here: `existing_root` rejected every other non-list.
        *slot = Value::Sequence(Vec::new());
    }
    let Value::Sequence(seq) = slot else {
        unreachable!("just made a sequence")
    };
    let mut entry = Some(entry);
    seq.retain_mut(|e| {
        if name_of(e) != Some(name) {
            return true;
        }
        match entry.take() {
            Some(new) => {
                *e = new;
                true
            }
            None => false,
        }
    });
    if let Some(new) = entry {
        seq.push(new);
    }
}

/// Sets `key`, keeping its position when present so rewritten files diff minimally.
fn set(map: &mut Mapping, key: &str, value: &str) {
    map.insert(key.into(), value.into());
}

fn emit(root: Mapping) -> Result<Secret> {
    serde_norway::to_string(&Value::Mapping(root))
        .map(Secret::new)
        .map_err(|_| KubeconfigError::Serialize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJDQUtFLUNBLURBVEEtRk9SLVRFU1RTCi0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K";
    const CERT: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUNMSUVOVC1DRVJULUZBS0UKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=";
    const KEY: &str = "LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQpTVVBFUi1TRUNSRVQtRkFLRS1LRVkKLS0tLS1FTkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K";

    fn admin_conf() -> String {
        format!(
            "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {CA}
    server: https://10.10.1.11:6443
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: kubernetes-admin
  name: kubernetes-admin@kubernetes
current-context: kubernetes-admin@kubernetes
kind: Config
preferences: {{}}
users:
- name: kubernetes-admin
  user:
    client-certificate-data: {CERT}
    client-key-data: {KEY}
"
        )
    }

    const OTHER: &str = "apiVersion: v1
kind: Config
preferences: {}
clusters:
- name: prod
  cluster:
    server: https://prod.example.com
    certificate-authority-data: UFJPRC1DQQ==
users:
- name: prod-admin
  user:
    token: prod-token
contexts:
- name: prod
  context:
    cluster: prod
    user: prod-admin
    namespace: web
current-context: prod
";

    fn yaml(s: &str) -> Value {
        serde_norway::from_str(s).unwrap()
    }

    fn names(v: &Value, list: &str) -> Vec<String> {
        v[list]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn lab(name: &str, server: Option<&str>) -> String {
        for_lab(&admin_conf(), name, server)
            .unwrap()
            .expose()
            .to_string()
    }

    #[test]
    fn for_lab_renames_and_keeps_everything_else() {
        let out = yaml(&lab("dev", None));
        assert_eq!(names(&out, "clusters"), ["klab-dev"]);
        assert_eq!(names(&out, "users"), ["klab-dev-admin"]);
        assert_eq!(names(&out, "contexts"), ["dev"]);
        assert_eq!(out["contexts"][0]["context"]["cluster"], "klab-dev");
        assert_eq!(out["contexts"][0]["context"]["user"], "klab-dev-admin");
        assert_eq!(out["current-context"], "dev");
        let cluster = &out["clusters"][0]["cluster"];
        assert_eq!(cluster["server"], "https://10.10.1.11:6443");
        assert_eq!(cluster["certificate-authority-data"], CA);
        let user = &out["users"][0]["user"];
        assert_eq!(user["client-certificate-data"], CERT);
        assert_eq!(user["client-key-data"], KEY);
        assert_eq!(out["kind"], "Config");
        assert_eq!(out["apiVersion"], "v1");
        assert!(out["preferences"].is_mapping());
    }

    #[test]
    fn for_lab_replaces_server_and_keeps_other_cluster_fields() {
        let conf = admin_conf().replace(
            "    server: https://10.10.1.11:6443\n",
            "    server: https://10.10.1.11:6443\n    tls-server-name: kubernetes\n",
        );
        let out = for_lab(&conf, "dev", Some("https://10.10.1.10:6443")).unwrap();
        let out = yaml(out.expose());
        let cluster = &out["clusters"][0]["cluster"];
        assert_eq!(cluster["server"], "https://10.10.1.10:6443");
        assert_eq!(cluster["tls-server-name"], "kubernetes");
        assert_eq!(cluster["certificate-authority-data"], CA);
    }

    #[test]
    fn output_is_deterministic_and_secret() {
        let a = for_lab(&admin_conf(), "dev", Some("https://[fd00::10]:6443")).unwrap();
        let b = for_lab(&admin_conf(), "dev", Some("https://[fd00::10]:6443")).unwrap();
        assert_eq!(a.expose(), b.expose());
        assert!(!format!("{a:?}").contains(KEY));
        let m1 = merge(Some(OTHER), a.expose(), true).unwrap();
        let m2 = merge(Some(OTHER), b.expose(), true).unwrap();
        assert_eq!(m1.expose(), m2.expose());
        // Merging the same lab again changes nothing.
        let m3 = merge(Some(m1.expose()), a.expose(), true).unwrap();
        assert_eq!(m1.expose(), m3.expose());
    }

    #[test]
    fn for_lab_accepts_any_single_entry_config() {
        let conf = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{server: 'https://lb:8443', certificate-authority-data: {CA}}}
users:
- name: u
  user: {{client-key-data: {KEY}}}
contexts:
- name: x
  context: {{cluster: c, user: u, namespace: kube-system}}
"
        );
        let out = yaml(for_lab(&conf, "lab1", None).unwrap().expose());
        assert_eq!(out["contexts"][0]["context"]["namespace"], "kube-system");
        assert_eq!(out["contexts"][0]["context"]["cluster"], "klab-lab1");
        assert_eq!(out["current-context"], "lab1");
        assert_eq!(out["clusters"][0]["cluster"]["server"], "https://lb:8443");
    }

    #[test]
    fn for_lab_errors() {
        let err = |text: &str| for_lab(text, "dev", None).unwrap_err();
        assert!(matches!(err("a: [b"), KubeconfigError::NotYaml { .. }));
        assert!(matches!(
            err("- just a list"),
            KubeconfigError::NotKubeconfig { .. }
        ));
        let wrong_kind = admin_conf().replace("kind: Config", "kind: Pod");
        assert_eq!(
            err(&wrong_kind).to_string(),
            "the cluster's admin.conf is not a kubeconfig: its `kind` is not `Config`"
        );
        let no_kind = admin_conf().replace("kind: Config\n", "");
        assert!(matches!(
            err(&no_kind),
            KubeconfigError::NotKubeconfig { .. }
        ));
        let two_users = format!("{}- name: second\n  user: {{token: t}}\n", admin_conf());
        assert_eq!(
            err(&two_users),
            KubeconfigError::NotSingle {
                doc: Document::AdminConf,
                list: "users",
                found: 2
            }
        );
        let no_contexts = admin_conf().replace(
            "- context:\n    cluster: kubernetes\n    user: kubernetes-admin\n  name: kubernetes-admin@kubernetes\n",
            "",
        );
        assert!(matches!(
            err(&no_contexts),
            KubeconfigError::NotSingle {
                list: "contexts",
                found: 0,
                ..
            }
        ));
        let no_server = admin_conf().replace("    server: https://10.10.1.11:6443\n", "");
        assert_eq!(
            err(&no_server).to_string(),
            "the cluster's admin.conf is not a usable kubeconfig: `clusters[0].cluster.server` is missing"
        );
        assert_eq!(
            for_lab(&admin_conf(), "", None).unwrap_err(),
            KubeconfigError::EmptyLab
        );
        assert_eq!(
            for_lab(&admin_conf(), "dev", Some("http://x:1")).unwrap_err(),
            KubeconfigError::BadServer
        );
    }

    #[test]
    fn errors_never_echo_key_material() {
        let key_as_kind = admin_conf().replace("kind: Config", &format!("kind: {KEY}"));
        let key_as_list = format!("apiVersion: v1\nkind: Config\nclusters: {KEY}\n");
        let broken = format!("{}  bad: [\n", admin_conf());
        let key_type_error = admin_conf().replace(
            &format!("client-key-data: {KEY}"),
            &format!("client-key-data: {KEY}\n  - {KEY}"),
        );
        let inputs = [
            key_as_kind.clone(),
            key_as_list.clone(),
            broken.clone(),
            key_type_error,
            admin_conf().replace("kind: Config\n", ""),
            format!("{KEY}: [{KEY}"),
            format!("{KEY}\n"),
        ];
        for text in &inputs {
            let mut errors = vec![
                for_lab(text, "dev", None).err(),
                server(text).err(),
                merge(Some(text), &lab("dev", None), true).err(),
                merge(None, text, true).err(),
                remove_lab(text, "dev").err(),
            ];
            errors.retain(Option::is_some);
            assert!(!errors.is_empty(), "no error for input");
            for e in errors.into_iter().flatten() {
                let shown = format!("{e} {e:?}");
                assert!(!shown.contains(KEY), "error leaks key: {shown}");
                assert!(!shown.contains("LS0t"), "error leaks key: {shown}");
            }
        }
    }

    #[test]
    fn server_and_host_port() {
        assert_eq!(server(&admin_conf()).unwrap(), "https://10.10.1.11:6443");
        let merged = merge(
            Some(OTHER),
            &lab("dev", Some("https://10.10.1.10:6443")),
            false,
        )
        .unwrap();
        // Current context is still `prod`, so its cluster is the one.
        assert_eq!(server(merged.expose()).unwrap(), "https://prod.example.com");
        let merged = merge(
            Some(OTHER),
            &lab("dev", Some("https://10.10.1.10:6443")),
            true,
        )
        .unwrap();
        assert_eq!(server(merged.expose()).unwrap(), "https://10.10.1.10:6443");
        let ambiguous = merged
            .expose()
            .replace("current-context: dev", "current-context: ''");
        assert_eq!(
            server(&ambiguous).unwrap_err(),
            KubeconfigError::NoCurrentCluster {
                doc: Document::Kubeconfig
            }
        );

        let hp = |s: &str| host_port(s);
        assert_eq!(
            hp("https://10.10.1.10:6443"),
            Some(("10.10.1.10".into(), 6443))
        );
        assert_eq!(
            hp("https://api.lab.example"),
            Some(("api.lab.example".into(), 443))
        );
        assert_eq!(hp("HTTPS://k8s:6443/"), Some(("k8s".into(), 6443)));
        assert_eq!(
            hp("https://k8s:6443/some/prefix?x=1"),
            Some(("k8s".into(), 6443))
        );
        assert_eq!(
            hp("https://[fd00::10]:6443"),
            Some(("fd00::10".into(), 6443))
        );
        assert_eq!(hp("https://[::1]"), Some(("::1".into(), 443)));
        for bad in [
            "http://10.0.0.1:6443",
            "10.0.0.1:6443",
            "https://",
            "https://:6443",
            "https://host:",
            "https://host:0",
            "https://host:65536",
            "https://host:+443",
            "https://host:64x",
            "https://fd00::10:6443",
            "https://[fd00::10",
            "https://[not-ip]:6443",
            "https://[::1]6443",
            "https://user@host:6443",
            "https://ho st:6443",
            "",
        ] {
            assert_eq!(hp(bad), None, "{bad}");
        }
    }

    #[test]
    fn merge_into_existing_keeps_others_in_order() {
        let out = merge(Some(OTHER), &lab("dev", None), false).unwrap();
        let out = yaml(out.expose());
        assert_eq!(names(&out, "clusters"), ["prod", "klab-dev"]);
        assert_eq!(names(&out, "users"), ["prod-admin", "klab-dev-admin"]);
        assert_eq!(names(&out, "contexts"), ["prod", "dev"]);
        // Not asked to switch, and the user had a current context.
        assert_eq!(out["current-context"], "prod");
        assert_eq!(out["users"][0]["user"]["token"], "prod-token");
        assert_eq!(out["contexts"][0]["context"]["namespace"], "web");
        assert_eq!(out["users"][1]["user"]["client-key-data"], KEY);

        let out = yaml(
            merge(Some(OTHER), &lab("dev", None), true)
                .unwrap()
                .expose(),
        );
        assert_eq!(out["current-context"], "dev");

        // A second lab goes after the first.
        let one = merge(Some(OTHER), &lab("dev", None), false).unwrap();
        let two = merge(Some(one.expose()), &lab("test", None), false).unwrap();
        let two = yaml(two.expose());
        assert_eq!(names(&two, "clusters"), ["prod", "klab-dev", "klab-test"]);
        assert_eq!(names(&two, "contexts"), ["prod", "dev", "test"]);
    }

    #[test]
    fn merge_replaces_stale_entries_in_place() {
        let old = merge(Some(OTHER), &lab("dev", None), false).unwrap();
        let other = merge(Some(old.expose()), &lab("test", None), false).unwrap();
        // The lab was recreated: new CA, new key, new address.
        let new_admin = admin_conf()
            .replace(CA, "TkVXLUNB")
            .replace(KEY, "TkVXLUtFWQ==")
            .replace("10.10.1.11", "10.10.2.11");
        let new_lab = for_lab(&new_admin, "dev", None).unwrap();
        let out = merge(Some(other.expose()), new_lab.expose(), false).unwrap();
        // Only the test lab still has the old CA.
        assert_eq!(out.expose().matches(CA).count(), 1);
        let out = yaml(out.expose());
        assert_eq!(names(&out, "clusters"), ["prod", "klab-dev", "klab-test"]);
        assert_eq!(
            names(&out, "users"),
            ["prod-admin", "klab-dev-admin", "klab-test-admin"]
        );
        assert_eq!(names(&out, "contexts"), ["prod", "dev", "test"]);
        assert_eq!(
            out["clusters"][1]["cluster"]["certificate-authority-data"],
            "TkVXLUNB"
        );
        assert_eq!(
            out["clusters"][1]["cluster"]["server"],
            "https://10.10.2.11:6443"
        );
        assert_eq!(out["users"][1]["user"]["client-key-data"], "TkVXLUtFWQ==");
        // The test lab's entries are untouched.
        assert_eq!(
            out["clusters"][2]["cluster"]["certificate-authority-data"],
            CA
        );
        assert_eq!(out["users"][2]["user"]["client-key-data"], KEY);
    }

    #[test]
    fn merge_drops_duplicate_stale_entries() {
        let existing = "apiVersion: v1
kind: Config
clusters:
- {name: klab-dev, cluster: {server: 'https://old:6443', certificate-authority-data: T0xE}}
- {name: prod, cluster: {server: 'https://prod'}}
- {name: klab-dev, cluster: {server: 'https://older:6443'}}
contexts: []
users: []
";
        let out = yaml(
            merge(Some(existing), &lab("dev", None), false)
                .unwrap()
                .expose(),
        );
        assert_eq!(names(&out, "clusters"), ["klab-dev", "prod"]);
        assert_eq!(
            out["clusters"][0]["cluster"]["certificate-authority-data"],
            CA
        );
    }

    #[test]
    fn merge_sets_current_context_when_none() {
        for none in ["", "current-context: \"\"\n", "current-context: null\n"] {
            let existing = OTHER.replace("current-context: prod\n", none);
            let out = yaml(
                merge(Some(&existing), &lab("dev", None), false)
                    .unwrap()
                    .expose(),
            );
            assert_eq!(out["current-context"], "dev");
        }
    }

    #[test]
    fn merge_into_nothing_gives_fresh_config() {
        let expected = merge(None, &lab("dev", None), false).unwrap();
        for blank in ["", "  \n\t\n", "# empty\n"] {
            let out = merge(Some(blank), &lab("dev", None), false).unwrap();
            assert_eq!(out.expose(), expected.expose());
        }
        let out = yaml(expected.expose());
        assert_eq!(out["apiVersion"], "v1");
        assert_eq!(out["kind"], "Config");
        assert_eq!(out["preferences"], Value::Mapping(Mapping::new()));
        assert_eq!(names(&out, "clusters"), ["klab-dev"]);
        assert_eq!(names(&out, "users"), ["klab-dev-admin"]);
        assert_eq!(names(&out, "contexts"), ["dev"]);
        assert_eq!(out["current-context"], "dev");
        assert!(
            expected
                .expose()
                .starts_with("apiVersion: v1\nkind: Config\n")
        );
    }

    #[test]
    fn merge_accepts_kubectl_quirks() {
        // kubectl writes `null` lists, and reads configs without apiVersion/kind.
        let existing = "clusters: null\nusers: null\ncontexts: null\ncurrent-context: \"\"\n";
        let out = merge(Some(existing), &lab("dev", None), false).unwrap();
        assert!(out.expose().starts_with("apiVersion: v1\nkind: Config\n"));
        let out = yaml(out.expose());
        assert_eq!(names(&out, "clusters"), ["klab-dev"]);
        assert_eq!(out["current-context"], "dev");
    }

    #[test]
    fn merge_refuses_non_kubeconfig_existing() {
        let lab = lab("dev", None);
        let cases = [
            (
                "kind: Deployment\napiVersion: apps/v1\n",
                "its `kind` is not `Config`",
            ),
            ("- a\n- b\n", "its top level is not a mapping"),
            ("just text\n", "its top level is not a mapping"),
            (
                "kind: Config\nclusters: {a: b}\n",
                "`clusters` is not a list",
            ),
            ("kind: Config\nusers: 3\n", "`users` is not a list"),
            (
                "kind: Config\ncontexts:\n- x\n",
                "`contexts[0]` is not a mapping",
            ),
            (
                "kind: Config\ncurrent-context: [a]\n",
                "`current-context` is not a string",
            ),
            (
                "kind: Config\nclusters: [\n",
                "is not a valid single YAML document",
            ),
        ];
        for (existing, want) in cases {
            let err = merge(Some(existing), &lab, true).unwrap_err().to_string();
            assert!(err.starts_with("the existing kubeconfig "), "{err}");
            assert!(err.contains(want), "{existing:?}: {err}");
        }
    }

    #[test]
    fn merge_refuses_bad_lab_config() {
        let err = merge(None, &admin_conf().replace("kind: Config", "kind: X"), true).unwrap_err();
        assert!(
            err.to_string().starts_with("the lab's kubeconfig "),
            "{err}"
        );
        let incoherent = lab("dev", None).replace("cluster: klab-dev\n", "cluster: prod\n");
        assert_eq!(
            merge(Some(OTHER), &incoherent, true).unwrap_err(),
            KubeconfigError::Inconsistent { doc: Document::Lab }
        );
    }

    #[test]
    fn remove_lab_removes_its_entries() {
        let with_dev = merge(Some(OTHER), &lab("dev", None), true).unwrap();
        let with_both = merge(Some(with_dev.expose()), &lab("test", None), false).unwrap();
        let out = remove_lab(with_both.expose(), "dev").unwrap().unwrap();
        let out = yaml(out.expose());
        assert_eq!(names(&out, "clusters"), ["prod", "klab-test"]);
        assert_eq!(names(&out, "users"), ["prod-admin", "klab-test-admin"]);
        assert_eq!(names(&out, "contexts"), ["prod", "test"]);
        // It pointed at the removed lab.
        assert_eq!(out["current-context"], "");

        let out = remove_lab(with_both.expose(), "test").unwrap().unwrap();
        let out = yaml(out.expose());
        assert_eq!(names(&out, "clusters"), ["prod", "klab-dev"]);
        assert_eq!(out["current-context"], "dev");

        // Merge then remove gives the user's file back, modulo the emptied current context.
        let round = remove_lab(
            merge(Some(OTHER), &lab("dev", None), false)
                .unwrap()
                .expose(),
            "dev",
        )
        .unwrap()
        .unwrap();
        assert_eq!(yaml(round.expose()), yaml(OTHER));
    }

    #[test]
    fn remove_lab_with_nothing_to_remove() {
        assert!(remove_lab(OTHER, "dev").unwrap().is_none());
        assert!(remove_lab("", "dev").unwrap().is_none());
        assert!(remove_lab("# nothing\n", "dev").unwrap().is_none());
        // A user's own context that happens to share the lab's name is not klab's.
        let own = OTHER.replace("- name: prod\n  context:", "- name: dev\n  context:");
        assert!(remove_lab(&own, "dev").unwrap().is_none());
        assert!(matches!(
            remove_lab("kind: Pod\n", "dev").unwrap_err(),
            KubeconfigError::NotKubeconfig { .. }
        ));
        assert_eq!(
            remove_lab(OTHER, "").unwrap_err(),
            KubeconfigError::EmptyLab
        );
    }
}
