//! Opaque page cursors for list queries: the sort-column values of the last
//! row returned, so the next page starts strictly after it (keyset paging).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::sql::sort_columns;
use eventplane_api::value::to_sql_text;
use eventplane_api::{ProjectionSpec, QuerySpec};

/// Builds the cursor that follows the last row of a page from that row's
/// sort values, a JSON array in `sort_columns` order as `list_sql`
/// returns it.
pub fn encode_cursor(sort_values: &str) -> String {
    URL_SAFE_NO_PAD.encode(sort_values)
}

/// Decodes a client-supplied cursor into SQL text values in `sort_columns`
/// order, checked against each column's type; it comes from outside, so
/// nothing in it is trusted.
pub fn decode_cursor(
    spec: &ProjectionSpec,
    query: &QuerySpec,
    s: &str,
) -> Result<Vec<String>, String> {
    let bad = |why: String| format!("invalid cursor: {why}");
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| bad(format!("not base64: {e}")))?;
    // Raw, so a number keeps every digit until its column's type reads it.
    let values: Vec<Box<RawValue>> =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a JSON array: {e}")))?;
    let cols = sort_columns(spec, query);
    if values.len() != cols.len() {
        return Err(bad(format!(
            "expected {} values, got {}",
            cols.len(),
            values.len()
        )));
    }
    cols.iter()
        .zip(&values)
        .map(|(c, raw)| {
            let text = raw.get();
            let value = if text.starts_with(|ch: char| ch == '-' || ch.is_ascii_digit()) {
                // A number, as its exact decimal text.
                Value::String(text.to_string())
            } else {
                serde_json::from_str(text).map_err(|e| bad(format!("{}: {e}", c.name)))?
            };
            to_sql_text(c.ty, &value)
                .map_err(|e| bad(format!("{}: {e}", c.name)))?
                .ok_or_else(|| bad(format!("{}: null", c.name)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_api::examples::orders as sample;
    use serde_json::json;

    #[test]
    fn cursor_round_trips_sort_values_then_key() {
        let spec = sample();
        let q = &spec.queries[0];
        // As `jsonb_build_array(t."created_at", t."id")::text` renders them.
        let cursor = encode_cursor(r#"["2024-05-01T12:00:00.123456+02:00", "o-17"]"#);
        assert!(
            cursor
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(
            decode_cursor(&spec, q, &cursor).unwrap(),
            ["2024-05-01T10:00:00.123456Z", "o-17"]
        );
    }

    #[test]
    fn numeric_sort_values_keep_every_digit() {
        let mut spec = sample();
        let mut q = spec.queries[2].clone();
        q.order_by[0].column = "total".into();
        spec.columns[3].nullable = false;
        let cursor = encode_cursor(r#"[12345678901234567890.123456789012, "o-1"]"#);
        assert_eq!(
            decode_cursor(&spec, &q, &cursor).unwrap(),
            ["12345678901234567890.123456789012", "o-1"]
        );
    }

    #[test]
    fn query_without_order_by_uses_the_key_only() {
        let spec = sample();
        let mut q = spec.queries[2].clone();
        q.order_by.clear();
        let cursor = encode_cursor(r#"["x"]"#);
        assert_eq!(decode_cursor(&spec, &q, &cursor).unwrap(), ["x"]);
    }

    #[test]
    fn malformed_cursors_are_rejected() {
        let spec = sample();
        let q = &spec.queries[0];
        let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        for (cursor, why) in [
            ("%%%".to_string(), "base64"),
            (URL_SAFE_NO_PAD.encode("nope"), "JSON array"),
            (enc(json!({"a": 1})), "array"),
            (enc(json!(["2024-05-01T00:00:00Z"])), "expected 2 values"),
            (enc(json!(["yesterday", "o1"])), "created_at"),
            (enc(json!(["2024-05-01T00:00:00Z", null])), "id: null"),
            (enc(json!(["2024-05-01T00:00:00Z", ["x"]])), "id"),
        ] {
            let e = decode_cursor(&spec, q, &cursor).unwrap_err();
            assert!(e.starts_with("invalid cursor: "), "{e}");
            assert!(e.contains(why), "{e} should mention {why}");
        }
    }
}
