//! Explicit escaping filters: templates are not auto-escaped, so every user-controlled value goes
//! through `xml` (libvirt XML) or `yaml` (cloud-init) by hand.

use minijinja::value::Value;
use minijinja::{Error, ErrorKind};

/// Escape for XML text and attribute values (either quote style).
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A YAML double-quoted scalar that reads back as exactly `s` (no tags, anchors or type guessing).
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // YAML forbids raw C0/C1 controls, DEL and the Unicode line separators in scalars.
            c if (c as u32) < 0x20 || (0x7f..=0x9f).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            '\u{feff}' => out.push_str("\\ufeff"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The string form of a template value; `none`/undefined are template bugs, not empty strings.
fn text(value: &Value, filter: &str) -> Result<String, Error> {
    if value.is_none() || value.is_undefined() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("`{filter}` filter applied to a missing value"),
        ));
    }
    Ok(match value.as_str() {
        Some(s) => s.to_string(),
        None => value.to_string(),
    })
}

pub fn xml(value: &Value) -> Result<String, Error> {
    text(value, "xml").map(|s| xml_escape(&s))
}

pub fn yaml(value: &Value) -> Result<String, Error> {
    text(value, "yaml").map(|s| yaml_quote(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_escapes_all_five_specials() {
        assert_eq!(
            xml_escape(r#"a&b<c>d"e'f"#),
            "a&amp;b&lt;c&gt;d&quot;e&apos;f"
        );
        assert_eq!(xml_escape("plain"), "plain");
    }

    #[test]
    fn yaml_quotes_and_escapes() {
        assert_eq!(yaml_quote("yes"), "\"yes\"");
        assert_eq!(yaml_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(yaml_quote("l1\nl2\n"), "\"l1\\nl2\\n\"");
        assert_eq!(yaml_quote("\u{1}"), "\"\\x01\"");
        assert_eq!(yaml_quote("#: {x}"), "\"#: {x}\"");
    }

    #[test]
    fn filters_reject_missing_values() {
        assert!(xml(&Value::from(())).is_err());
        assert!(yaml(&Value::UNDEFINED).is_err());
        assert_eq!(yaml(&Value::from(1450)).ok().as_deref(), Some("\"1450\""));
    }
}
