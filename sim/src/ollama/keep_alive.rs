//! Keep-alive: how long an idle runner stays loaded, decoded from a request's `keep_alive`
//! the way Ollama's `api.Duration` does (seconds as a number, or Go's duration syntax with
//! `time.ParseDuration`'s error texts).

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::request::{go_quote, ApiError};

/// How long an idle runner stays loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeepAlive {
    For(Duration),
    Forever,
}

impl KeepAlive {
    pub(super) fn from_config(d: Duration) -> Self {
        if d.as_nanos() >= i64::MAX as u128 {
            KeepAlive::Forever
        } else {
            KeepAlive::For(d)
        }
    }

    /// When the idle timer started at `from` fires (Go: `now + MaxInt64` for forever).
    pub(super) fn until(self, from: SystemTime) -> SystemTime {
        match self {
            KeepAlive::For(d) => from + d,
            KeepAlive::Forever => from + Duration::from_nanos(i64::MAX as u64),
        }
    }
}

/// `keep_alive` as `api.Duration` decodes it (docs/providers.md §1.8); `None` = absent (server default).
pub(super) fn parse_keep_alive(v: Option<&Value>) -> Result<Option<KeepAlive>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let secs = n.as_f64().unwrap_or(0.0);
            if secs < 0.0 {
                Ok(Some(KeepAlive::Forever))
            } else {
                // Go: time.Duration(int(t) * int(time.Second)).
                Ok(Some(KeepAlive::For(Duration::from_secs(
                    secs.trunc() as u64
                ))))
            }
        }
        Some(Value::String(s)) => match parse_go_duration(s) {
            Ok(ns) if ns < 0 => Ok(Some(KeepAlive::Forever)),
            Ok(ns) => Ok(Some(KeepAlive::For(Duration::from_nanos(ns as u64)))),
            Err(msg) => Err(ApiError::bad(msg)),
        },
        Some(Value::Bool(_)) => Err(ApiError::bad("Unsupported type: 'bool'")),
        Some(Value::Array(_)) => Err(ApiError::bad("Unsupported type: '[]interface {}'")),
        Some(Value::Object(_)) => Err(ApiError::bad("Unsupported type: 'map[string]interface {}'")),
    }
}

/// Go's `time.ParseDuration`, with its error texts; nanoseconds.
pub(super) fn parse_go_duration(orig: &str) -> Result<i64, String> {
    let invalid = || format!("time: invalid duration {}", go_quote(orig));
    let mut s = orig;
    let mut neg = false;
    if let Some(c) = s.chars().next() {
        if c == '-' || c == '+' {
            neg = c == '-';
            s = &s[1..];
        }
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let b = s.as_bytes();
        if !(b[0] == b'.' || b[0].is_ascii_digit()) {
            return Err(invalid());
        }
        let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if s.starts_with('.') {
            s = &s[1..];
            let frac_len = s.bytes().take_while(|c| c.is_ascii_digit()).count();
            frac_part = &s[..frac_len];
            s = &s[frac_len..];
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(invalid());
            }
        } else if int_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = s
            .bytes()
            .take_while(|c| !(*c == b'.' || c.is_ascii_digit()))
            .count();
        if unit_len == 0 {
            return Err(format!("time: missing unit in duration {}", go_quote(orig)));
        }
        let unit_str = &s[..unit_len];
        s = &s[unit_len..];
        let unit: u128 = match unit_str {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(format!(
                    "time: unknown unit {} in duration {}",
                    go_quote(unit_str),
                    go_quote(orig)
                ))
            }
        };
        let int_val: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut value = int_val.checked_mul(unit).ok_or_else(invalid)?;
        if !frac_part.is_empty() {
            let digits = &frac_part[..frac_part.len().min(30)];
            let f: u128 = digits.parse().map_err(|_| invalid())?;
            let scale = 10u128.pow(digits.len() as u32);
            value += f.saturating_mul(unit) / scale;
        }
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > i64::MAX as u128 {
            return Err(invalid());
        }
    }
    let total = total as i64;
    Ok(if neg { -total } else { total })
}
