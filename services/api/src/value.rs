//! Conversion of JSON values and query-string text into the text form of a
//! column's Postgres type.
//!
//! Every value is bound as `text` and cast in SQL (`$1::numeric`), so a value
//! that passes here must be accepted by the cast: a bad value is reported
//! against the event or request that carried it instead of failing a whole
//! batch in the database. Values that Postgres considers equal (`5` and `+5`,
//! two spellings of one UUID or instant) get one canonical text so that keys
//! fold together in Rust exactly as they collide in the table.

use chrono::{DateTime, DurationRound, SecondsFormat, TimeDelta, Utc};
use serde_json::Value;

use crate::types::ColumnType;

/// Converts a JSON value to the text of a `ty` value; JSON null is `None`.
pub fn to_sql_text(ty: ColumnType, v: &Value) -> Result<Option<String>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let mismatch = || Err(format!("expected {}, got {}", ty.name(), describe(v)));
    let text = match (ty, v) {
        (ColumnType::Jsonb, v) => {
            // jsonb rejects the \u0000 escape.
            if has_nul(v) {
                return Err("jsonb cannot hold the NUL character".into());
            }
            v.to_string()
        }
        (ty, Value::String(s)) => match str_to_sql_text(ty, s)? {
            Some(text) => text,
            None => return mismatch(),
        },
        (ColumnType::Text, Value::Number(n)) => n.to_string(),
        (ColumnType::Text, Value::Bool(b)) => b.to_string(),
        (ColumnType::Bigint, Value::Number(n)) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => return mismatch(),
        },
        (ColumnType::Integer, Value::Number(n)) => {
            match n.as_i64().and_then(|i| i32::try_from(i).ok()) {
                Some(i) => i.to_string(),
                None => return mismatch(),
            }
        }
        (ColumnType::Numeric, Value::Number(n)) => n.to_string(),
        (ColumnType::Double, Value::Number(n)) => match n.as_f64() {
            Some(f) if f.is_finite() => render_f64(f),
            _ => return mismatch(),
        },
        (ColumnType::Boolean, Value::Bool(b)) => b.to_string(),
        _ => return mismatch(),
    };
    Ok(Some(text))
}

/// The text of a `ty` value written as the string `s` (a JSON string, a
/// path segment, a query parameter); `None` when `s` is not one. Not for
/// jsonb, whose strings are JSON values of their own.
fn str_to_sql_text(ty: ColumnType, s: &str) -> Result<Option<String>, String> {
    let text = match ty {
        ColumnType::Text => {
            no_nul(s)?;
            s.to_owned()
        }
        ColumnType::Bigint => match s.parse::<i64>() {
            Ok(i) => i.to_string(),
            Err(_) => return Ok(None),
        },
        ColumnType::Integer => match s.parse::<i32>() {
            Ok(i) => i.to_string(),
            Err(_) => return Ok(None),
        },
        ColumnType::Numeric if is_decimal(s) => s.to_owned(),
        ColumnType::Double => match s.parse::<f64>() {
            Ok(f) if f.is_finite() => render_f64(f),
            _ => return Ok(None),
        },
        ColumnType::Boolean if s == "true" || s == "false" => s.to_owned(),
        ColumnType::Timestamptz => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => render_timestamp(t.with_timezone(&Utc)),
            Err(_) => return Ok(None),
        },
        ColumnType::Uuid => match uuid::Uuid::parse_str(s) {
            Ok(u) => u.hyphenated().to_string(),
            Err(_) => return Ok(None),
        },
        _ => return Ok(None),
    };
    Ok(Some(text))
}

/// Converts a query-string filter value to the text of a `ty` value. The
/// value is read as it is, not copied into a JSON string first: a cache hit
/// parses its key here.
pub fn parse_param(ty: ColumnType, s: &str) -> Result<String, String> {
    if ty == ColumnType::Jsonb {
        return Err("jsonb columns cannot be used as filters".into());
    }
    str_to_sql_text(ty, s)?.ok_or_else(|| {
        format!(
            "expected {}, got {}",
            ty.name(),
            describe(&Value::String(s.to_owned()))
        )
    })
}

/// Converts a literal `value` of an assignment. For jsonb the text is parsed
/// as JSON, so `[]` stores an empty array rather than the string "[]".
pub fn literal_to_sql_text(ty: ColumnType, literal: &str) -> Result<String, String> {
    let v = if ty == ColumnType::Jsonb {
        serde_json::from_str(literal).map_err(|e| format!("expected JSON text: {e}"))?
    } else {
        Value::String(literal.to_owned())
    };
    to_sql_text(ty, &v)?.ok_or_else(|| "a literal value cannot be null".to_owned())
}

/// Short description of a JSON value for error messages; long strings are
/// cut so a dead-letter reason stays small.
pub(crate) fn describe(v: &Value) -> String {
    const MAX: usize = 40;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => {
            if s.chars().count() > MAX {
                let cut: String = s.chars().take(MAX).collect();
                format!("string {cut:?}…")
            } else {
                format!("string {s:?}")
            }
        }
        Value::Array(_) => "array".into(),
        Value::Object(_) => "object".into(),
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn no_nul(s: &str) -> Result<(), String> {
    // Postgres text cannot store NUL; catching it here keeps one bad event
    // from failing a batch.
    if s.contains('\0') {
        Err("text cannot contain the NUL character".into())
    } else {
        Ok(())
    }
}

/// Debug formatting of f64 is the shortest text that round-trips and uses
/// an exponent for very large or small values, all of which Postgres reads.
fn render_f64(f: f64) -> String {
    // -0 equals 0 in Postgres; one spelling keeps keys canonical.
    let f = if f == 0.0 { 0.0 } else { f };
    format!("{f:?}")
}

/// Postgres keeps microseconds, so two instants that differ only below that
/// are the same value there and must be the same text here.
fn render_timestamp(t: DateTime<Utc>) -> String {
    let t = t.duration_round(TimeDelta::microseconds(1)).unwrap_or(t);
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Strict decimal: `^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$`. Postgres
/// numeric also reads `NaN` and `Infinity`, which a read model should not
/// receive silently from a string.
pub(crate) fn is_decimal(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = i - frac_start;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let exp_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return false;
        }
    }
    i == b.len()
}

/// An exact decimal: `mantissa × 10^-scale`, with Postgres' display scale
/// (`1.50` has scale 2, `1.5e3` scale 0). `None` when it does not fit.
fn decimal(s: &str) -> Option<(i128, u32)> {
    if !is_decimal(s) {
        return None;
    }
    let (body, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], s[i + 1..].parse::<i32>().ok()?),
        None => (s, 0),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = format!("{int}{frac}");
    let mut mantissa: i128 = if digits.trim_start_matches(['+', '-']).is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let frac_digits = i32::try_from(frac.len()).ok()?;
    let scale = frac_digits.checked_sub(exp)?;
    if scale < 0 {
        mantissa = mantissa.checked_mul(10i128.checked_pow(scale.unsigned_abs())?)?;
        return Some((mantissa, 0));
    }
    Some((mantissa, u32::try_from(scale).ok()?))
}

/// Two decimals brought to the larger scale.
fn aligned(a: (i128, u32), b: (i128, u32)) -> Option<(i128, i128, u32)> {
    let scale = a.1.max(b.1);
    let up = |(m, s): (i128, u32)| m.checked_mul(10i128.checked_pow(scale - s)?);
    Some((up(a)?, up(b)?, scale))
}

fn render_decimal(m: i128, scale: u32) -> String {
    let digits = m.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    let sign = if m < 0 { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// `a + b` as Postgres computes it for values of `ty` (numeric keeps the
/// larger display scale). `None` when this crate cannot compute it
/// exactly, or Postgres would refuse it (out of range).
pub fn add_values(ty: ColumnType, a: &str, b: &str) -> Option<String> {
    match ty {
        ColumnType::Bigint => Some(
            a.parse::<i64>()
                .ok()?
                .checked_add(b.parse().ok()?)?
                .to_string(),
        ),
        ColumnType::Integer => Some(
            a.parse::<i32>()
                .ok()?
                .checked_add(b.parse().ok()?)?
                .to_string(),
        ),
        ColumnType::Numeric => {
            let (x, y, scale) = aligned(decimal(a)?, decimal(b)?)?;
            Some(render_decimal(x.checked_add(y)?, scale))
        }
        ColumnType::Double => {
            let sum = a.parse::<f64>().ok()? + b.parse::<f64>().ok()?;
            sum.is_finite().then(|| render_f64(sum))
        }
        _ => None,
    }
}

/// The order Postgres gives two values of `ty`, for the types whose order
/// does not depend on a collation (`text` is compared by code point, which
/// callers use only where that is the rule). `None` when this crate cannot
/// order them.
pub fn compare_values(ty: ColumnType, a: &str, b: &str) -> Option<std::cmp::Ordering> {
    match ty {
        ColumnType::Bigint | ColumnType::Integer => {
            Some(a.parse::<i64>().ok()?.cmp(&b.parse::<i64>().ok()?))
        }
        ColumnType::Numeric => {
            let (x, y, _) = aligned(decimal(a)?, decimal(b)?)?;
            Some(x.cmp(&y))
        }
        ColumnType::Double => a.parse::<f64>().ok()?.partial_cmp(&b.parse::<f64>().ok()?),
        ColumnType::Boolean => Some((a == "true").cmp(&(b == "true"))),
        ColumnType::Timestamptz => Some(
            DateTime::parse_from_rfc3339(a)
                .ok()?
                .cmp(&DateTime::parse_from_rfc3339(b).ok()?),
        ),
        // Canonical lower-case hyphenated text orders like the bytes.
        ColumnType::Uuid | ColumnType::Text => Some(a.cmp(b)),
        ColumnType::Jsonb => None,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn decimals_add_and_compare_like_postgres() {
        let n = ColumnType::Numeric;
        assert_eq!(add_values(n, "1.50", "2.5").as_deref(), Some("4.00"));
        assert_eq!(add_values(n, "1.5e3", "-0.25").as_deref(), Some("1499.75"));
        assert_eq!(add_values(n, "-3", "1").as_deref(), Some("-2"));
        assert_eq!(add_values(n, "0.05", "-0.1").as_deref(), Some("-0.05"));
        assert_eq!(add_values(n, ".5", "1e-2").as_deref(), Some("0.51"));
        assert_eq!(add_values(n, "1e40", "1"), None);
        assert_eq!(
            add_values(ColumnType::Bigint, &i64::MAX.to_string(), "1"),
            None
        );
        assert_eq!(
            add_values(ColumnType::Integer, "7", "-9").as_deref(),
            Some("-2")
        );
        assert_eq!(
            add_values(ColumnType::Double, "0.5", "0.25").as_deref(),
            Some("0.75")
        );
        assert_eq!(add_values(ColumnType::Text, "a", "b"), None);
        use std::cmp::Ordering::*;
        assert_eq!(compare_values(n, "1.50", "1.5"), Some(Equal));
        assert_eq!(compare_values(n, "-2", "1e-3"), Some(Less));
        assert_eq!(
            compare_values(
                ColumnType::Timestamptz,
                "2024-01-01T10:00:00+02:00",
                "2024-01-01T09:00:00Z"
            ),
            Some(Less)
        );
        assert_eq!(
            compare_values(ColumnType::Boolean, "true", "false"),
            Some(Greater)
        );
        assert_eq!(compare_values(ColumnType::Jsonb, "1", "1"), None);
    }
    use super::*;
    use serde_json::json;

    fn ok(ty: ColumnType, v: Value) -> String {
        to_sql_text(ty, &v).unwrap().unwrap()
    }

    fn err(ty: ColumnType, v: Value) -> String {
        to_sql_text(ty, &v).unwrap_err()
    }

    const EVERY_TYPE: [ColumnType; 9] = [
        ColumnType::Text,
        ColumnType::Bigint,
        ColumnType::Integer,
        ColumnType::Numeric,
        ColumnType::Double,
        ColumnType::Boolean,
        ColumnType::Timestamptz,
        ColumnType::Uuid,
        ColumnType::Jsonb,
    ];

    #[test]
    fn null_is_none_for_every_type() {
        for ty in EVERY_TYPE {
            assert_eq!(to_sql_text(ty, &Value::Null), Ok(None));
        }
    }

    #[test]
    fn text_accepts_scalars_and_rejects_containers() {
        assert_eq!(ok(ColumnType::Text, json!("a'b")), "a'b");
        assert_eq!(ok(ColumnType::Text, json!(12.5)), "12.5");
        assert_eq!(ok(ColumnType::Text, json!(true)), "true");
        assert_eq!(
            err(ColumnType::Text, json!({"a": 1})),
            "expected text, got object"
        );
        assert_eq!(
            err(ColumnType::Text, json!([1])),
            "expected text, got array"
        );
        assert!(err(ColumnType::Text, json!("a\0b")).contains("NUL"));
    }

    #[test]
    fn bigint_accepts_i64_numbers_and_strings() {
        assert_eq!(ok(ColumnType::Bigint, json!(-42)), "-42");
        assert_eq!(
            ok(ColumnType::Bigint, json!(i64::MAX)),
            i64::MAX.to_string()
        );
        assert_eq!(ok(ColumnType::Bigint, json!("+7")), "7");
        assert_eq!(
            err(ColumnType::Bigint, json!(u64::MAX)),
            format!("expected bigint, got number {}", u64::MAX)
        );
        assert!(to_sql_text(ColumnType::Bigint, &json!(1.5)).is_err());
        assert!(to_sql_text(ColumnType::Bigint, &json!("1.0")).is_err());
        assert!(to_sql_text(ColumnType::Bigint, &json!("9223372036854775808")).is_err());
        assert!(to_sql_text(ColumnType::Bigint, &json!(true)).is_err());
    }

    #[test]
    fn integer_is_limited_to_i32() {
        assert_eq!(ok(ColumnType::Integer, json!(2147483647)), "2147483647");
        assert_eq!(ok(ColumnType::Integer, json!("-5")), "-5");
        assert!(to_sql_text(ColumnType::Integer, &json!(2147483648_i64)).is_err());
        assert!(to_sql_text(ColumnType::Integer, &json!("2147483648")).is_err());
    }

    #[test]
    fn numeric_accepts_numbers_and_strict_decimal_strings() {
        assert_eq!(ok(ColumnType::Numeric, json!(12.5)), "12.5");
        assert_eq!(ok(ColumnType::Numeric, json!(3)), "3");
        for s in ["0", "-1.50", "+.5", "5.", "1e10", "1.5E-3", "007"] {
            assert_eq!(ok(ColumnType::Numeric, json!(s)), s);
        }
        for s in [
            "", ".", "abc", "NaN", "Infinity", "1e", "1.2.3", " 1", "1 ", "--1", "0x10", "1e+",
        ] {
            assert!(
                to_sql_text(ColumnType::Numeric, &json!(s)).is_err(),
                "{s:?}"
            );
        }
        assert_eq!(
            err(ColumnType::Numeric, json!("abc")),
            "expected numeric, got string \"abc\""
        );
    }

    #[test]
    fn double_accepts_finite_values_only() {
        assert_eq!(ok(ColumnType::Double, json!(1.5)), "1.5");
        assert_eq!(ok(ColumnType::Double, json!(2)), "2.0");
        assert_eq!(ok(ColumnType::Double, json!("1e300")), "1e300");
        assert_eq!(ok(ColumnType::Double, json!("-0")), "0.0");
        for s in ["inf", "NaN", "infinity", "1e400", "x"] {
            assert!(to_sql_text(ColumnType::Double, &json!(s)).is_err(), "{s:?}");
        }
    }

    #[test]
    fn boolean_accepts_bools_and_their_names() {
        assert_eq!(ok(ColumnType::Boolean, json!(false)), "false");
        assert_eq!(ok(ColumnType::Boolean, json!("true")), "true");
        assert!(to_sql_text(ColumnType::Boolean, &json!("yes")).is_err());
        assert!(to_sql_text(ColumnType::Boolean, &json!(1)).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_normalised_to_utc() {
        assert_eq!(
            ok(ColumnType::Timestamptz, json!("2024-05-01T12:00:00+02:00")),
            "2024-05-01T10:00:00Z"
        );
        assert_eq!(
            ok(
                ColumnType::Timestamptz,
                json!("2024-05-01T10:00:00.123456789Z")
            ),
            "2024-05-01T10:00:00.123457Z"
        );
        assert!(to_sql_text(ColumnType::Timestamptz, &json!("2024-05-01")).is_err());
        assert!(to_sql_text(ColumnType::Timestamptz, &json!("yesterday")).is_err());
        assert!(to_sql_text(ColumnType::Timestamptz, &json!(1714557600)).is_err());
    }

    #[test]
    fn uuids_are_rendered_hyphenated_lowercase() {
        assert_eq!(
            ok(ColumnType::Uuid, json!("67E5504410B1426F9247BB680E5FE0C8")),
            "67e55044-10b1-426f-9247-bb680e5fe0c8"
        );
        assert!(to_sql_text(ColumnType::Uuid, &json!("not-a-uuid")).is_err());
    }

    #[test]
    fn jsonb_takes_any_value_as_compact_json() {
        assert_eq!(
            ok(ColumnType::Jsonb, json!({"a": [1, "x"]})),
            r#"{"a":[1,"x"]}"#
        );
        assert_eq!(ok(ColumnType::Jsonb, json!("s")), r#""s""#);
        assert!(to_sql_text(ColumnType::Jsonb, &json!({"k": ["a\0"]})).is_err());
        assert!(to_sql_text(ColumnType::Jsonb, &json!("\\u0000")).is_ok());
    }

    #[test]
    fn params_are_parsed_as_strings_and_jsonb_is_refused() {
        assert_eq!(parse_param(ColumnType::Bigint, "10"), Ok("10".into()));
        assert_eq!(parse_param(ColumnType::Text, "x y"), Ok("x y".into()));
        assert!(parse_param(ColumnType::Bigint, "ten").is_err());
        assert!(parse_param(ColumnType::Jsonb, "{}").is_err());
    }

    #[test]
    fn a_param_reads_as_the_same_text_in_json_would() {
        let texts = [
            "",
            "o-1",
            "+5",
            "-0",
            "1e3",
            "3000000000",
            "NaN",
            "true",
            "2024-05-01T12:00:00.1234567+02:00",
            "67E5504410B1426F9247BB680E5FE0C8",
            "a\0b",
        ];
        // Jsonb takes no parameters (its strings are JSON values of their own).
        for ty in EVERY_TYPE.into_iter().filter(|ty| *ty != ColumnType::Jsonb) {
            for text in texts {
                let as_json = to_sql_text(ty, &json!(text)).map(|t| t.expect("not null"));
                assert_eq!(parse_param(ty, text), as_json, "{ty:?} {text:?}");
            }
        }
    }

    #[test]
    fn literals_for_jsonb_are_parsed_as_json() {
        assert_eq!(
            literal_to_sql_text(ColumnType::Jsonb, "[]"),
            Ok("[]".into())
        );
        assert!(literal_to_sql_text(ColumnType::Jsonb, "PAID").is_err());
        assert!(literal_to_sql_text(ColumnType::Jsonb, "null").is_err());
        assert_eq!(
            literal_to_sql_text(ColumnType::Text, "PAID"),
            Ok("PAID".into())
        );
        assert!(literal_to_sql_text(ColumnType::Integer, "x").is_err());
    }

    #[test]
    fn long_strings_are_cut_in_errors() {
        let long = "x".repeat(100);
        let e = err(ColumnType::Bigint, json!(long));
        assert!(e.len() < 80, "{e}");
    }
}
