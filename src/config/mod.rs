//! Lab file loading and validation: `lab.toml` → [`crate::model::Lab`], or every error found,
//! each with file, line, column, field and a hint.

mod diagnostic;

pub use diagnostic::{Diagnostic, Diagnostics};

use crate::model::Lab;

/// Parse and validate lab-file text. `file` is the name used in messages. Pure (no I/O).
pub fn parse_str(src: &str, file: &str) -> Result<Lab, Diagnostics> {
    let _ = src;
    Err(Diagnostics(vec![Diagnostic {
        file: file.to_string(),
        line: 1,
        col: 1,
        field: String::new(),
        message: "lab file parsing is not implemented yet".into(),
        hint: None,
    }]))
}
