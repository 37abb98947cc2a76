//! Parsing of the Go-style durations used in Function specs (`"60s"`, `"1m30s"`, `"500ms"`).
//!
//! Kubernetes users write durations the way Go's `time.ParseDuration` reads them, so the
//! spec stores them as strings (the CRD schema checks the shape with [`DURATION_PATTERN`])
//! and this module turns them into [`std::time::Duration`] once, when a spec is resolved.

use std::time::Duration;

/// The regular expression the CRD schema uses for every duration field. It accepts a
/// sequence of `<number><unit>` with units `ms`, `s`, `m`, `h` (decimals allowed).
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("{0:?} is not a duration (use e.g. 30s, 1m30s, 500ms)")]
    Malformed(String),
    #[error("{0:?} is too long")]
    Overflow(String),
}

/// Parses `"1m30s"`, `"500ms"`, `"1.5h"`, `"0s"`. A bare `"0"` is accepted as zero, as in Go.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let malformed = || DurationError::Malformed(input.to_string());
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total = 0f64;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        if start == i {
            return Err(malformed());
        }
        let number: f64 = s[start..i].parse().map_err(|_| malformed())?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let seconds_per_unit = match &s[unit_start..i] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(malformed()),
        };
        total += number * seconds_per_unit;
    }
    // A century is far beyond any timeout; refusing more keeps arithmetic on Instants safe.
    if !total.is_finite() || total > 100.0 * 365.0 * 86400.0 {
        return Err(DurationError::Overflow(input.to_string()));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration the way a user would write it in a spec (`90s` -> `1m30s`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if secs > 0 {
        out.push_str(&format!("{secs}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2h1m1s"), Ok(Duration::from_secs(7261)));
    }

    #[test]
    fn refuses_what_go_refuses() {
        for bad in ["", "10", "s", "10 s", "10sec", "-5s", "1d", "1m30", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(matches!(
            parse_duration("99999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn formats_back_to_spec_notation() {
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }
}
