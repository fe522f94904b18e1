//! A row's key as one string. For a one-column key it is the column's SQL
//! text; for a composite key, a JSON array of the columns' SQL texts in key
//! order (`["acme","o-1"]`). Each part is canonical for its type, so one
//! row has one key string: the fold groups changes by it, and the caches
//! and invalidations address rows by it unchanged. Only the SQL statements
//! take it apart, one parameter per key column.

use eventplane_api::{ProjectionSpec, parse_param};

/// The key string of a row whose key columns hold `parts`, in key order.
pub fn encode(mut parts: Vec<String>) -> String {
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        serde_json::to_string(&parts).expect("strings serialize")
    }
}

/// The SQL text of each key column, in key order.
///
/// # Panics
/// On a composite key string that [`encode`] did not make.
pub fn parts(spec: &ProjectionSpec, key: &str) -> Vec<String> {
    if spec.keys.is_empty() {
        return vec![key.to_string()];
    }
    let parts: Vec<String> = serde_json::from_str(key)
        .unwrap_or_else(|e| panic!("composite key {key:?} was not encoded here: {e}"));
    assert_eq!(parts.len(), spec.keys.len(), "composite key {key:?}");
    parts
}

/// The key string of the row a client names by one text per key column
/// (the row route's path segments), each parsed as its column's type.
/// The error names the column.
pub fn from_params<S: AsRef<str>>(spec: &ProjectionSpec, params: &[S]) -> Result<String, String> {
    let columns = spec.key_columns();
    if params.len() != columns.len() {
        return Err(format!(
            "the key has {} column(s) ({}); the path gives {}",
            columns.len(),
            spec.key_names().join(", "),
            params.len()
        ));
    }
    let parts = columns
        .zip(params)
        .map(|(col, text)| {
            parse_param(col.ty, text.as_ref()).map_err(|e| format!("{}: {e}", col.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(encode(parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_api::examples::orders;

    fn composite() -> ProjectionSpec {
        let mut spec = orders();
        spec.columns[1].ty = eventplane_api::ColumnType::Text;
        spec.keys = vec![spec.columns[1].name.clone(), spec.key.clone()];
        spec.key.clear();
        spec
    }

    #[test]
    fn one_column_keys_are_the_column_text() {
        let spec = orders();
        assert_eq!(encode(vec!["o-1".into()]), "o-1");
        assert_eq!(parts(&spec, "[\"a\",\"b\"]"), ["[\"a\",\"b\"]"]);
        assert_eq!(from_params(&spec, &["o-1"]).unwrap(), "o-1");
    }

    #[test]
    fn composite_keys_round_trip_whatever_the_parts_hold() {
        let spec = composite();
        for parts_in in [
            vec!["acme".to_string(), "o-1".to_string()],
            vec!["a\",\"b".to_string(), "[]".to_string()],
            vec![String::new(), "/".to_string()],
        ] {
            let key = encode(parts_in.clone());
            assert_eq!(parts(&spec, &key), parts_in);
        }
        // Different parts never meet in one string.
        assert_ne!(
            encode(vec!["a,b".into(), "c".into()]),
            encode(vec!["a".into(), "b,c".into()])
        );
    }

    #[test]
    fn params_are_checked_per_column_and_counted() {
        let mut spec = composite();
        spec.columns[0].ty = eventplane_api::ColumnType::Bigint;
        let e = from_params(&spec, &["acme"]).unwrap_err();
        assert!(e.contains("2 column(s)"), "{e}");
        let e = from_params(&spec, &["acme", "x"]).unwrap_err();
        assert!(e.starts_with(&format!("{}:", spec.columns[0].name)), "{e}");
        assert_eq!(
            from_params(&spec, &["acme", "007"]).unwrap(),
            encode(vec!["acme".into(), "7".into()])
        );
    }
}
