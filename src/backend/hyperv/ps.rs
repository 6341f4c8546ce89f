//! How a script reaches `powershell.exe` and how its answer comes back: `-EncodedCommand` (base64 of
//! UTF-16LE) when it fits the Windows command line, else a UTF-8-with-BOM `.ps1` run with `-File`
//! (Windows PowerShell 5.1 reads a BOM-less file as the ANSI code page); one JSON document on
//! stdout, or the error envelope the script's `catch` writes with the cmdlet's own message.

pub use crate::render::powershell::{PsQuoteError, PsScript, ps_quote};

/// CreateProcess takes at most 32,767 UTF-16 units; keep room for the executable and the flags.
pub const MAX_COMMAND_LINE: usize = 32_767;
const FLAGS_ROOM: usize = 512;

/// The fixed flags: no profile, no prompts, no execution policy surprises.
pub const POWERSHELL_FLAGS: &[&str] = &[
    "-NoLogo",
    "-NoProfile",
    "-NonInteractive",
    "-ExecutionPolicy",
    "Bypass",
];

/// `-EncodedCommand` argument: base64 of the script's UTF-16LE bytes.
pub fn encode_command(script: &str) -> String {
    let bytes: Vec<u8> = script.encode_utf16().flat_map(u16::to_le_bytes).collect();
    base64(&bytes)
}

/// How a script of this text is passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    Encoded(String),
    /// Too long for a command line: write [`script_file_bytes`] to a `.ps1` and pass `-File`.
    File,
}

pub fn invocation(script: &str) -> Invocation {
    let encoded = encode_command(script);
    if encoded.len() + FLAGS_ROOM <= MAX_COMMAND_LINE {
        Invocation::Encoded(encoded)
    } else {
        Invocation::File
    }
}

/// A `.ps1` file's bytes: UTF-8 with a BOM, CRLF line ends.
pub fn script_file_bytes(script: &str) -> Vec<u8> {
    let mut out = vec![0xEF, 0xBB, 0xBF];
    for line in script.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        let body = body.strip_suffix('\r').unwrap_or(body);
        out.extend_from_slice(body.as_bytes());
        if line.ends_with('\n') {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// The error envelope a klab script writes from its `catch`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorEnvelope {
    pub message: String,
    #[serde(default)]
    pub error_id: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub command: String,
}

/// The last non-empty stdout line (earlier lines are stray host output).
fn last_line(stdout: &str) -> Option<&str> {
    stdout
        .trim_start_matches('\u{feff}')
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
}

/// Read a klab script's answer: `Ok(json)` on success, `Err(message)` with the cmdlet's own words.
pub fn read_result(
    stdout: &str,
    stderr: &str,
    code: Option<i32>,
) -> Result<serde_json::Value, String> {
    let line = last_line(stdout);
    let parsed = line.map(serde_json::from_str::<serde_json::Value>);
    if let Some(Ok(v)) = &parsed
        && v.get("klabError").and_then(serde_json::Value::as_bool) == Some(true)
    {
        let e: ErrorEnvelope = serde_json::from_value(v.clone())
            .map_err(|e| format!("unreadable error envelope: {e}"))?;
        let mut msg = e.message.trim().to_string();
        if !e.command.is_empty() {
            msg = format!("{}: {msg}", e.command);
        }
        if !e.error_id.is_empty() {
            msg = format!("{msg} ({})", e.error_id);
        }
        return Err(msg);
    }
    match (code, parsed) {
        (Some(0), Some(Ok(v))) => Ok(v),
        (Some(0), Some(Err(e))) => Err(format!(
            "PowerShell printed something other than JSON ({e})"
        )),
        (Some(0), None) => Err("PowerShell printed nothing".into()),
        (code, _) => {
            let tail = stderr.trim();
            let tail: String = tail
                .chars()
                .rev()
                .take(800)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(match code {
                Some(c) => format!("powershell.exe exited with status {c}: {tail}"),
                None => format!("powershell.exe was killed by a signal: {tail}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn encoded_command_is_utf16le_base64() {
        // `dir` in UTF-16LE is 64 00 69 00 72 00.
        assert_eq!(encode_command("dir"), "ZABpAHIA");
        // Non-ASCII survives: U+00FC is FC 00, U+30CE is CE 30.
        assert_eq!(encode_command("üノ"), "/ADOMA==");
    }

    #[test]
    fn long_scripts_go_to_a_file() {
        assert!(matches!(invocation("Get-VM"), Invocation::Encoded(e) if e == "RwBlAHQALQBWAE0A"));
        // 12,300 characters → 24,600 UTF-16 bytes → 32,800 base64 characters: over the limit.
        let long = "#".repeat(12_300);
        assert!(
            invocation(&long) == Invocation::File,
            "12,300 characters must go to a file"
        );
        let fits = "#".repeat(11_800);
        assert!(matches!(invocation(&fits), Invocation::Encoded(_)));
    }

    #[test]
    fn script_files_have_a_bom_and_crlf() {
        assert_eq!(
            script_file_bytes("a\nü\r\nc"),
            b"\xEF\xBB\xBFa\r\n\xC3\xBC\r\nc".to_vec()
        );
    }

    #[test]
    fn results_and_error_envelopes() {
        assert_eq!(
            read_result("WARNING: noise\n[{\"Name\":\"x\"}]\r\n", "", Some(0)).unwrap(),
            serde_json::json!([{"Name": "x"}])
        );
        let env = r#"{"klabError":true,"message":"Hyper-V was unable to find a virtual machine with name \"x\".","errorId":"InvalidParameter,Microsoft.HyperV.PowerShell.Commands.GetVM","category":"InvalidArgument","command":"Get-VM"}"#;
        assert_eq!(
            read_result(env, "", Some(1)).unwrap_err(),
            "Get-VM: Hyper-V was unable to find a virtual machine with name \"x\". (InvalidParameter,Microsoft.HyperV.PowerShell.Commands.GetVM)"
        );
        assert_eq!(
            read_result("", "#< CLIXML\nAccess denied", Some(1)).unwrap_err(),
            "powershell.exe exited with status 1: #< CLIXML\nAccess denied"
        );
        assert_eq!(
            read_result("", "", Some(0)).unwrap_err(),
            "PowerShell printed nothing"
        );
        assert!(
            read_result("not json", "", Some(0))
                .unwrap_err()
                .starts_with("PowerShell printed something other than JSON")
        );
        assert_eq!(
            read_result("", "", None).unwrap_err(),
            "powershell.exe was killed by a signal: "
        );
    }
}
