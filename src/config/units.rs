//! Sizes (`"2GiB"`), durations (`"90s"`) and names: the small parsers validation is built from.

use std::time::Duration;

/// Why a size or duration did not parse; validation turns it into a message and hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitError {
    /// Not `<integer><unit>`.
    Syntax,
    /// A bare number where a unit is required.
    NoUnit,
    /// A unit other than the accepted ones (the unit as written).
    Unit(String),
    /// A decimal number (`"1.5GiB"`).
    Fraction,
    Zero,
    TooLarge,
    /// The size is not a whole number of GiB (disk).
    NotWholeGib,
}

pub const SIZE_UNITS_HINT: &str = "write an integer followed by MiB or GiB, e.g. \"2GiB\" or \"1536MiB\" (M, G, MB and GB are not accepted)";
pub const DISK_UNITS_HINT: &str =
    "write a whole number of GiB, e.g. \"20GiB\" (MiB also accepted when it is a multiple of 1024)";
pub const DURATION_HINT: &str =
    "write a duration like \"90s\", \"5m\", \"1h\" or \"1m30s\", or an integer number of seconds";

/// Split `"2GiB"` / `"2 GiB"` into (2, "GiB").
fn split_number(s: &str) -> Result<(u64, &str), UnitError> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(UnitError::Syntax);
    }
    let n: u64 = s[..digits].parse().map_err(|_| UnitError::TooLarge)?;
    let rest = &s[digits..];
    if rest.starts_with(['.', ',']) {
        return Err(UnitError::Fraction);
    }
    Ok((n, rest.trim_start()))
}

/// Memory in MiB from `"<n>MiB"` or `"<n>GiB"`.
pub fn parse_size_mib(s: &str) -> Result<u64, UnitError> {
    let (n, unit) = split_number(s)?;
    let mib = match unit {
        "MiB" => n,
        "GiB" => n.checked_mul(1024).ok_or(UnitError::TooLarge)?,
        "" => return Err(UnitError::NoUnit),
        other => return Err(UnitError::Unit(other.to_string())),
    };
    if mib == 0 {
        return Err(UnitError::Zero);
    }
    // 16 TiB: far beyond any lab, keeps later arithmetic (bytes) clear of overflow.
    if mib > 16 * 1024 * 1024 {
        return Err(UnitError::TooLarge);
    }
    Ok(mib)
}

/// Disk size in whole GiB.
pub fn parse_disk_gib(s: &str) -> Result<u64, UnitError> {
    let mib = parse_size_mib(s)?;
    if mib % 1024 != 0 {
        return Err(UnitError::NotWholeGib);
    }
    Ok(mib / 1024)
}

/// `"90s"`, `"5m"`, `"1h"`, `"1m30s"`; a bare number is seconds. Each unit at most once, largest
/// first (`"5m5m"` and `"30s1m"` are typos, not durations).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(UnitError::Syntax);
    }
    let mut total: u64 = 0;
    // Factor of the last unit seen: the next one must be smaller.
    let mut last = u64::MAX;
    while !rest.is_empty() {
        let (n, after) = split_number(rest)?;
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = after.split_at(unit_len);
        let factor = match unit {
            "s" | "" => 1,
            "m" => 60,
            "h" => 3600,
            other => return Err(UnitError::Unit(other.to_string())),
        };
        // A bare number is only valid alone ("90"), not in "1m30".
        if unit.is_empty() && (total != 0 || !tail.trim().is_empty()) {
            return Err(UnitError::Syntax);
        }
        if factor >= last {
            return Err(UnitError::Syntax);
        }
        last = factor;
        total = n
            .checked_mul(factor)
            .and_then(|v| total.checked_add(v))
            .ok_or(UnitError::TooLarge)?;
        rest = tail.trim_start();
    }
    if total == 0 {
        return Err(UnitError::Zero);
    }
    Ok(Duration::from_secs(total))
}

/// An RFC 1123 label: 1–63 of `[a-z0-9-]`, not starting or ending with `-`.
pub fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Lab names end up in every object name (`klab-<lab>-<node>`), so they are short hostname labels.
pub const LAB_NAME_MAX: usize = 20;

pub fn is_lab_name(s: &str) -> bool {
    is_hostname(s) && s.len() <= LAB_NAME_MAX
}

/// A login name `useradd` accepts everywhere: `[a-z_][a-z0-9_-]{0,31}`.
pub fn is_user_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && s.len() <= 32
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// Edit distance counting a swap of two neighbours as one edit (optimal string alignment), for
/// "did you mean" hints: `nmae` is one typo away from `name`.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// The closest candidate within a distance that still looks like a typo (case ignored).
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("2 GiB"), Ok(2048));
        assert_eq!(parse_size_mib("1536MiB"), Ok(1536));
        assert_eq!(parse_size_mib("2G"), Err(UnitError::Unit("G".into())));
        assert_eq!(parse_size_mib("2GB"), Err(UnitError::Unit("GB".into())));
        assert_eq!(parse_size_mib("2gib"), Err(UnitError::Unit("gib".into())));
        assert_eq!(parse_size_mib("2048"), Err(UnitError::NoUnit));
        assert_eq!(parse_size_mib("GiB"), Err(UnitError::Syntax));
        assert_eq!(parse_size_mib("1.5GiB"), Err(UnitError::Fraction));
        assert_eq!(parse_size_mib("0MiB"), Err(UnitError::Zero));
        assert_eq!(
            parse_size_mib("99999999999999999999GiB"),
            Err(UnitError::TooLarge)
        );
        assert_eq!(parse_size_mib("17000000GiB"), Err(UnitError::TooLarge));
    }

    #[test]
    fn disks() {
        assert_eq!(parse_disk_gib("20GiB"), Ok(20));
        assert_eq!(parse_disk_gib("2048MiB"), Ok(2));
        assert_eq!(parse_disk_gib("1500MiB"), Err(UnitError::NotWholeGib));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h 5m"), Ok(Duration::from_secs(3900)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("1m30"), Err(UnitError::Syntax));
        assert_eq!(
            parse_duration("5 minutes"),
            Err(UnitError::Unit("minutes".into()))
        );
        assert_eq!(parse_duration("0s"), Err(UnitError::Zero));
        assert_eq!(parse_duration(""), Err(UnitError::Syntax));
        assert_eq!(parse_duration("soon"), Err(UnitError::Syntax));
        assert_eq!(parse_duration("1h1m1s"), Ok(Duration::from_secs(3661)));
        assert_eq!(parse_duration("5m5m"), Err(UnitError::Syntax));
        assert_eq!(parse_duration("30s1m"), Err(UnitError::Syntax));
        assert_eq!(parse_duration("1h 2h"), Err(UnitError::Syntax));
        assert_eq!(parse_duration("0m30s"), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn names() {
        assert!(is_hostname("cp1"));
        assert!(is_hostname("alma-w1"));
        assert!(!is_hostname("Cp1"));
        assert!(!is_hostname("-a"));
        assert!(!is_hostname("a-"));
        assert!(!is_hostname("a_b"));
        assert!(!is_hostname(""));
        assert!(is_hostname(&"a".repeat(63)));
        assert!(!is_hostname(&"a".repeat(64)));
        assert!(is_lab_name("demo-01"));
        assert!(!is_lab_name(&"a".repeat(21)));
        assert!(is_user_name("klab"));
        assert!(is_user_name("_svc"));
        assert!(!is_user_name("1abc"));
        assert!(!is_user_name("Klab"));
    }

    #[test]
    fn typo_suggestions() {
        assert_eq!(edit_distance("memroy", "memory"), 1);
        assert_eq!(edit_distance("nmae", "name"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        let keys = ["name", "memory", "cpus", "disk", "nics"];
        assert_eq!(did_you_mean("memroy", keys), Some("memory"));
        assert_eq!(did_you_mean("cpu", keys), Some("cpus"));
        assert_eq!(did_you_mean("NAME", keys), Some("name"));
        assert_eq!(did_you_mean("nmae", keys), Some("name"));
        assert_eq!(did_you_mean("flavour", keys), None);
    }
}
