//! Unknown keys, all of them in one run: the spanned TOML tree is walked against the lab file's own
//! JSON Schema (the one `klab schema` prints), so the known key sets cannot drift from the structs.

use serde_json::{Map, Value};
use toml::de::{DeTable, DeValue};

use super::units::did_you_mean;

/// One unknown key: where it is, its dotted path, and where it was found (for the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    pub span: std::ops::Range<usize>,
    pub path: String,
    pub key: String,
    /// Human name of the enclosing table: `node \`cp1\``, `[kubernetes]`; empty at top level.
    pub owner: String,
    pub suggestion: Option<String>,
    pub known: Vec<String>,
}

/// Every key of `table` that `schema` does not allow.
pub fn unknown_keys(table: &DeTable<'_>, schema: &Value) -> Vec<UnknownKey> {
    let mut out = Vec::new();
    walk_table(table, schema, schema, "", "", &mut out);
    out.sort_by_key(|u| u.span.start);
    out
}

/// Follow `$ref: "#/$defs/X"`.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    let mut s = schema;
    // Bounded: refs between `$defs` never chain more than a few levels.
    for _ in 0..8 {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) => match r
                .strip_prefix("#/$defs/")
                .and_then(|name| root.get("$defs")?.get(name))
            {
                Some(target) => s = target,
                None => return s,
            },
            None => return s,
        }
    }
    s
}

/// Properties of an object schema, and its `additionalProperties` schema (maps).
type ObjectView<'a> = (Option<&'a Map<String, Value>>, Option<&'a Value>);

/// The object form of a schema (through `$ref` and `anyOf`/`oneOf`, as `Option<T>` produces):
/// its properties and its `additionalProperties` schema (for maps).
fn object_view<'a>(root: &'a Value, schema: &'a Value) -> Option<ObjectView<'a>> {
    let s = resolve(root, schema);
    let props = s.get("properties").and_then(Value::as_object);
    let additional = s.get("additionalProperties").filter(|v| v.is_object());
    if props.is_some() || additional.is_some() {
        return Some((props, additional));
    }
    ["anyOf", "oneOf"]
        .iter()
        .filter_map(|k| s.get(*k).and_then(Value::as_array))
        .flatten()
        .find_map(|alt| object_view(root, alt))
}

fn array_items<'a>(root: &'a Value, schema: &'a Value) -> Option<&'a Value> {
    let s = resolve(root, schema);
    if let Some(items) = s.get("items") {
        return Some(items);
    }
    ["anyOf", "oneOf"]
        .iter()
        .filter_map(|k| s.get(*k).and_then(Value::as_array))
        .flatten()
        .find_map(|alt| array_items(root, alt))
}

fn singular(key: &str) -> &str {
    key.strip_suffix('s').unwrap_or(key)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn walk_table(
    table: &DeTable<'_>,
    schema: &Value,
    root: &Value,
    path: &str,
    owner: &str,
    out: &mut Vec<UnknownKey>,
) {
    let Some((props, additional)) = object_view(root, schema) else {
        return;
    };
    for (key, value) in table.iter() {
        let k: &str = key.get_ref();
        let child_path = join(path, k);
        if let Some(child) = props.and_then(|p| p.get(k)) {
            let child_owner = if owner.is_empty() {
                format!("[{k}]")
            } else {
                format!("{owner} {k}")
            };
            walk_value(
                value.get_ref(),
                child,
                root,
                &child_path,
                &child_owner,
                k,
                out,
            );
        } else if let Some(child) = additional {
            // A map entry such as `[networks.cluster]`: named by its key.
            let parent = path.rsplit('.').next().unwrap_or(path);
            let child_owner = format!("{} `{k}`", singular(parent));
            walk_value(
                value.get_ref(),
                child,
                root,
                &child_path,
                &child_owner,
                k,
                out,
            );
        } else {
            let known: Vec<String> = props
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            out.push(UnknownKey {
                span: key.span(),
                path: child_path,
                key: k.to_string(),
                owner: owner.to_string(),
                suggestion: did_you_mean(k, known.iter().map(String::as_str)).map(str::to_string),
                known,
            });
        }
    }
}

fn walk_value(
    value: &DeValue<'_>,
    schema: &Value,
    root: &Value,
    path: &str,
    owner: &str,
    key: &str,
    out: &mut Vec<UnknownKey>,
) {
    match value {
        DeValue::Table(t) => walk_table(t, schema, root, path, owner, out),
        DeValue::Array(items) => {
            let Some(item_schema) = array_items(root, schema) else {
                return;
            };
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                // Top-level arrays of tables (`[[nodes]]`) are named by their `name`.
                let name = match item.get_ref() {
                    DeValue::Table(t) if !path.contains('.') && !path.contains('[') => t
                        .iter()
                        .find(|(k, _)| k.get_ref() == "name")
                        .and_then(|(_, v)| v.get_ref().as_str().map(str::to_string)),
                    _ => None,
                };
                let item_owner = match name {
                    Some(n) => format!("{} `{n}`", singular(key)),
                    None if owner.starts_with('[') => item_path.clone(),
                    None => format!("{owner}[{i}]"),
                };
                walk_value(
                    item.get_ref(),
                    item_schema,
                    root,
                    &item_path,
                    &item_owner,
                    key,
                    out,
                );
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(src: &str) -> Vec<(String, String, Option<String>)> {
        let t = DeTable::parse(src).unwrap();
        let schema = crate::config::schema_json();
        unknown_keys(t.get_ref(), &schema)
            .into_iter()
            .map(|u| (u.path, u.owner, u.suggestion))
            .collect()
    }

    #[test]
    fn finds_unknown_keys_at_every_level() {
        let src = r#"
nmae = "x"
[host]
acel = "qemu"
[networks.lan]
mode = "nat"
cidrr = "10.0.0.0/24"
[images.custom]
pth = "/x"
[[nodes]]
name = "cp1"
memroy = "2GiB"
nics = [ { network = "lan", adress = "10.0.0.5" } ]
[kubernetes]
versoin = "1.32"
[timeouts]
ssh-timeout = "5m"
"#;
        let got = find(src);
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            got,
            vec![
                ("nmae".into(), "".into(), s("name")),
                ("host.acel".into(), "[host]".into(), s("accel")),
                (
                    "networks.lan.cidrr".into(),
                    "network `lan`".into(),
                    s("cidr")
                ),
                (
                    "images.custom.pth".into(),
                    "image `custom`".into(),
                    s("path")
                ),
                ("nodes[0].memroy".into(), "node `cp1`".into(), s("memory")),
                (
                    "nodes[0].nics[0].adress".into(),
                    "node `cp1` nics[0]".into(),
                    None
                ),
                (
                    "kubernetes.versoin".into(),
                    "[kubernetes]".into(),
                    s("version")
                ),
                ("timeouts.ssh-timeout".into(), "[timeouts]".into(), None),
            ]
        );
    }

    #[test]
    fn known_keys_pass() {
        let src =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/labs/quickstart.toml"))
                .unwrap();
        assert_eq!(find(&src), vec![]);
    }
}
