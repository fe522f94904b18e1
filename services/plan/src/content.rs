//! Which parts of a projection spec a change touches. One table decides it
//! for everyone: the rebuild resumes a half-built version only while its
//! row-deciding fields are unchanged, and the operator replaces a rebuild
//! Job only when what the Job builds changed (never for an autoscaler
//! writing `scaling.replicas`).

use eventplane_api::ProjectionSpec;
use serde_json::{Map, Value};

/// What a top-level spec field bears on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bearing {
    /// Which rows a version's table holds: a change needs a new version.
    Rows,
    /// How a version is built, not its rows (indexes come after the load).
    Build,
    /// Only how a version is served or kept.
    Serving,
}

/// The bearing of a top-level field, by its manifest (camelCase) name. A
/// field this build does not know is taken to change the rows: the safe
/// side is a rebuild that was not needed.
pub fn bearing(field: &str) -> Bearing {
    match field {
        "table" | "version" | "key" | "columns" | "handlers" | "onError" => Bearing::Rows,
        "indexes" | "database" | "rebuild" => Bearing::Build,
        // The transport cannot change (the catalog refuses it), and either
        // one gives the same rows.
        "queries" | "cache" | "scaling" | "reclaimPolicy" | "transport" => Bearing::Serving,
        _ => Bearing::Rows,
    }
}

fn fields(spec: &ProjectionSpec, keep: impl Fn(Bearing) -> bool) -> Value {
    let Value::Object(all) = serde_json::to_value(spec).expect("specs serialize") else {
        unreachable!("a spec serializes to an object");
    };
    let kept: Map<String, Value> = all
        .into_iter()
        .filter(|(field, _)| keep(bearing(field)))
        .collect();
    Value::Object(kept)
}

/// The fields that decide a version's rows.
pub fn rows(spec: &ProjectionSpec) -> Value {
    fields(spec, |b| b == Bearing::Rows)
}

/// The fields that decide what a rebuild does: the rows and how they are
/// built.
pub fn build(spec: &ProjectionSpec) -> Value {
    fields(spec, |b| b != Bearing::Serving)
}

/// Whether two specs give a version the same rows.
pub fn same_rows(a: &ProjectionSpec, b: &ProjectionSpec) -> bool {
    rows(a) == rows(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_api::examples::orders;
    use eventplane_api::{DatabaseRef, ReclaimPolicy};

    /// Every top-level field of the spec, with what it bears on. A new
    /// field fails this test until it is classified here and in `bearing`.
    const FIELDS: &[(&str, Bearing)] = &[
        ("table", Bearing::Rows),
        ("version", Bearing::Rows),
        ("key", Bearing::Rows),
        ("columns", Bearing::Rows),
        ("handlers", Bearing::Rows),
        ("onError", Bearing::Rows),
        ("indexes", Bearing::Build),
        ("database", Bearing::Build),
        ("rebuild", Bearing::Build),
        ("queries", Bearing::Serving),
        ("cache", Bearing::Serving),
        ("scaling", Bearing::Serving),
        ("transport", Bearing::Serving),
        ("reclaimPolicy", Bearing::Serving),
    ];

    fn every_field_set() -> ProjectionSpec {
        let mut spec = orders();
        spec.database = Some(DatabaseRef {
            secret_name: "db".into(),
            key: "url".into(),
        });
        spec.reclaim_policy = ReclaimPolicy::Delete;
        spec.transport = Some(eventplane_api::transport::TransportSpec {
            kind: eventplane_api::transport::TransportKind::Kafka,
            topic: "events".into(),
        });
        spec
    }

    #[test]
    fn every_spec_field_is_classified() {
        let Value::Object(all) = serde_json::to_value(every_field_set()).unwrap() else {
            panic!("not an object")
        };
        let mut seen: Vec<&str> = all.keys().map(String::as_str).collect();
        seen.sort();
        let mut listed: Vec<&str> = FIELDS.iter().map(|(f, _)| *f).collect();
        listed.sort();
        assert_eq!(
            seen, listed,
            "classify every spec field in FIELDS and `bearing`"
        );
        for (field, expected) in FIELDS {
            assert_eq!(bearing(field), *expected, "{field}");
        }
    }

    #[test]
    fn rows_keep_only_row_fields_and_build_adds_build_fields() {
        let spec = every_field_set();
        let rows = rows(&spec);
        let build = build(&spec);
        for (field, bearing) in FIELDS {
            assert_eq!(
                rows.get(*field).is_some(),
                *bearing == Bearing::Rows,
                "rows: {field}"
            );
            assert_eq!(
                build.get(*field).is_some(),
                *bearing != Bearing::Serving,
                "build: {field}"
            );
        }
    }

    #[test]
    fn serving_changes_keep_the_rows_and_row_changes_do_not() {
        let spec = orders();
        let mut served = spec.clone();
        served.queries.pop();
        served.cache.enabled = false;
        served.scaling.replicas = Some(3);
        served.indexes.pop();
        assert!(same_rows(&spec, &served));
        let mut handled = spec.clone();
        handled.handlers.pop();
        assert!(!same_rows(&spec, &handled));
        let mut halting = spec.clone();
        halting.on_error = eventplane_api::ErrorPolicy::Halt;
        assert!(!same_rows(&spec, &halting));
    }

    #[test]
    fn unknown_fields_count_as_rows() {
        assert_eq!(bearing("somethingNew"), Bearing::Rows);
    }
}
