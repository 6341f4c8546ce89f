//! A lab-file error a person can act on: where (file:line:col, field), what, and how to fix it.
//! Also the one escaping rule for values quoted in any message ([`escape`]).

use std::borrow::Cow;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    /// Dotted path of the field, e.g. `nodes[1].nics[0].ip` (empty for file-level errors).
    pub field: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A diagnostic is one line (and a hint line): whatever the lab file quoted into it
        // (a key with a newline, an escape sequence) is shown escaped.
        write!(
            f,
            "{}:{}:{}: {}",
            escape(&self.file),
            self.line,
            self.col,
            escape(&self.message)
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {}", escape(hint))?;
        }
        Ok(())
    }
}

/// All errors of one lab file, sorted by position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Characters that must not reach a terminal raw from a quoted value: controls (newline, tab, CR,
/// NUL, ESC, DEL, C1) and the invisible ones that reorder or hide text (bidi overrides, zero-width).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

fn escape_with(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| needs_escape(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) && !keep(c) {
            // Rust's own escapes: `\n`, `\t`, `\0`, `\u{1b}`.
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` with every control or invisible character written as an escape (`\n`, `\0`, `\u{1b}`), so a
/// quoted value can neither break its line nor drive the terminal. Printable text is unchanged.
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_with(s, |_| false)
}

/// Like [`escape`] but keeps line breaks: for messages whose own layout has several lines.
pub fn escape_keep_lines(s: &str) -> Cow<'_, str> {
    escape_with(s, |c| c == '\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_printable_text_is_not() {
        assert_eq!(escape("cp1 née `x` \"q\" \\"), "cp1 née `x` \"q\" \\");
        assert_eq!(escape("a\nb\tc\0d"), "a\\nb\\tc\\0d");
        assert_eq!(escape("\u{1b}[2J\u{7f}\u{9b}"), "\\u{1b}[2J\\u{7f}\\u{9b}");
        assert_eq!(escape("ab\u{202e}cd\u{200b}"), "ab\\u{202e}cd\\u{200b}");
        assert_eq!(escape_keep_lines("one\ntwo\r\u{1b}"), "one\ntwo\\r\\u{1b}");
    }

    #[test]
    fn a_diagnostic_stays_on_its_lines() {
        let d = Diagnostic {
            file: "lab\n.toml".into(),
            line: 3,
            col: 1,
            field: "nodes[0].name".into(),
            message: "node name `a\u{1b}]0;pwned\u{7}` is not valid".into(),
            hint: Some("not `\n`".into()),
        };
        assert_eq!(
            d.to_string(),
            "lab\\n.toml:3:1: node name `a\\u{1b}]0;pwned\\u{7}` is not valid\n  hint: not `\\n`"
        );
    }
}
