//! Plan data → template values, via serde_json (minijinja's own serde support is not enabled).

use std::collections::BTreeMap;

use minijinja::value::Value;
use serde::Serialize;

/// Convert any serializable plan data to a template value. Plan types serialize infallibly; a failure
/// becomes `none`, which strict templates then reject when they use it.
pub fn to_value<T: Serialize>(data: &T) -> Value {
    serde_json::to_value(data)
        .map(|v| from_json(&v))
        .unwrap_or_else(|_| Value::from(()))
}

fn from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::from(n.as_f64().unwrap_or(0.0))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => items.iter().map(from_json).collect(),
        serde_json::Value::Object(map) => Value::from_object(
            map.iter()
                .map(|(k, v)| (k.clone(), from_json(v)))
                .collect::<BTreeMap<String, Value>>(),
        ),
    }
}
