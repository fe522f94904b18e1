//! Mapping one event envelope onto a row change, as declared by the spec's
//! handlers: its key, its column effects, whether its `when` condition
//! holds, and the values its `if` condition binds.

use std::fmt;

use serde_json::Value;

use eventplane_api::condition::{Condition, parse_guard, parse_when};
use eventplane_api::value::{literal_to_sql_text, to_sql_text};
use eventplane_api::{Assignment, ColumnOp, ColumnSpec, HandlerSpec, Op, ProjectionSpec};

use crate::fold::{Effect, Guard, Patch};

/// The effect of one event on one row. Values are the SQL text of the
/// column's type; `None` is NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChange {
    /// The row's key string: see [`crate::key`].
    pub key: String,
    pub kind: ChangeKind,
    /// Apply only where this holds on the row.
    pub guard: Option<Guard>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// Insert the row with these effects on a row of nulls, or apply them.
    Upsert(Patch),
    /// Apply these effects if the row exists.
    Update(Patch),
    /// Delete the row if it exists.
    Delete,
}

/// Why an event could not be mapped; the text is stored as the dead-letter
/// reason, so it names the pointer and the column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError(pub String);

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MapError {}

/// A spec's handlers with their conditions compiled, to map many events.
pub struct Mapper<'a> {
    spec: &'a ProjectionSpec,
    /// Per handler: the compiled `when` and `if`.
    conditions: Vec<(Option<Condition>, Option<Condition>)>,
}

impl<'a> Mapper<'a> {
    /// # Panics
    /// On a condition that does not compile, which `validate` rules out.
    pub fn new(spec: &'a ProjectionSpec) -> Self {
        let conditions =
            spec.handlers
                .iter()
                .map(|h| {
                    let when = h.when.as_deref().map(|w| {
                        parse_when(w).unwrap_or_else(|e| panic!("validated when {w:?}: {e}"))
                    });
                    let guard = h.guard.as_deref().map(|g| {
                        parse_guard(g, &spec.columns)
                            .unwrap_or_else(|e| panic!("validated if {g:?}: {e}"))
                    });
                    (when, guard)
                })
                .collect();
        Mapper { spec, conditions }
    }

    /// Maps an event envelope (`{"type", "streamId", "streamVersion",
    /// "position", "recordedAt", "data", "metadata"}`) to a row change.
    /// Ok(None) when no handler is declared for the event type, or its
    /// `when` condition does not hold.
    pub fn map(&self, envelope: &Value) -> Result<Option<RowChange>, MapError> {
        let spec = self.spec;
        let Some(event_type) = envelope.get("type").and_then(Value::as_str) else {
            return Err(MapError("envelope has no string field \"type\"".into()));
        };
        let Some(index) = spec.handler_index(event_type) else {
            return Ok(None);
        };
        let handler = &spec.handlers[index];
        let (when, guard) = &self.conditions[index];
        if let Some(when) = when {
            let values = when
                .bind(envelope)
                .map_err(|e| MapError(format!("when: {e}")))?;
            if !when.holds(&values) {
                return Ok(None);
            }
        }
        let key = row_key(spec, handler, envelope)?;
        let mut columns = Patch::new();
        for a in &handler.set {
            let col = spec
                .column(&a.column)
                .ok_or_else(|| MapError(format!("unknown column {}", a.column)))?;
            if let Some(effect) = effect(a, col, envelope)? {
                columns.insert(col.name.clone(), effect);
            }
        }
        let guard = match guard {
            None => None,
            Some(g) => Some(Guard {
                handler: index,
                params: g.bind(envelope).map_err(|e| MapError(format!("if: {e}")))?,
            }),
        };
        let kind = match handler.op {
            Op::Upsert => ChangeKind::Upsert(columns),
            Op::Update => ChangeKind::Update(columns),
            Op::Delete => ChangeKind::Delete,
        };
        Ok(Some(RowChange { key, kind, guard }))
    }
}

/// Maps one event with `spec`'s handlers (see [`Mapper::map`]).
pub fn map_event(spec: &ProjectionSpec, envelope: &Value) -> Result<Option<RowChange>, MapError> {
    Mapper::new(spec).map(envelope)
}

/// The row's key string (see [`crate::key`]): each key column's value from
/// the handler's `key` or its entry in `keys`.
fn row_key(
    spec: &ProjectionSpec,
    handler: &HandlerSpec,
    envelope: &Value,
) -> Result<String, MapError> {
    let parts = spec
        .key_columns()
        .map(|col| {
            let pointers = handler.key_pointers(&col.name);
            key_part(col, &pointers, envelope)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::key::encode(parts))
}

/// What the first of several pointers found.
enum Found<'e> {
    /// The first value other than null, and the pointer that held it.
    Value(&'e str, &'e Value),
    /// None held a value, but at least one held null.
    Null,
    Missing,
}

/// The first of `pointers` that holds a value other than null.
fn first_value<'e>(pointers: &[&'e str], envelope: &'e Value) -> Found<'e> {
    let mut found = Found::Missing;
    for pointer in pointers {
        match envelope.pointer(pointer) {
            Some(Value::Null) => found = Found::Null,
            Some(v) => return Found::Value(pointer, v),
            None => {}
        }
    }
    found
}

/// One key column's SQL text: the first of `pointers` present and not null.
fn key_part(col: &ColumnSpec, pointers: &[&str], envelope: &Value) -> Result<String, MapError> {
    let value = first_value(pointers, envelope);
    let null = |at: &str| MapError(format!("{at}: null for key column {}", col.name));
    match value {
        Found::Value(pointer, v) => to_sql_text(col.ty, v)
            .map_err(|e| MapError(format!("{pointer}: {e}")))?
            .ok_or_else(|| null(pointer)),
        Found::Null => Err(null(&pointers.join(", "))),
        Found::Missing => Err(MapError(format!(
            "missing value at {} for key column {}",
            pointers.join(", "),
            col.name
        ))),
    }
}

/// The value an assignment reads: the first of its pointers that holds a
/// value other than null, else its default, else null if one held null.
fn source_value(
    a: &Assignment,
    col: &ColumnSpec,
    envelope: &Value,
) -> Result<Option<String>, MapError> {
    let pointers = a.pointers();
    let literal = |text: &str| {
        literal_to_sql_text(col.ty, text)
            .map(Some)
            .map_err(|e| MapError(format!("value for column {}: {e}", col.name)))
    };
    if pointers.is_empty() {
        // An add without a source counts.
        return literal(a.value.as_deref().unwrap_or("1"));
    }
    match (first_value(&pointers, envelope), &a.default) {
        (Found::Value(pointer, v), _) => {
            to_sql_text(col.ty, v).map_err(|e| MapError(format!("{pointer}: {e}")))
        }
        (_, Some(d)) => literal(d),
        (Found::Null, None) => Ok(None),
        (Found::Missing, None) => Err(MapError(format!(
            "missing value at {} for column {}",
            pointers.join(", "),
            col.name
        ))),
    }
}

/// The effect of one assignment; `None` when a null leaves it without one.
fn effect(a: &Assignment, col: &ColumnSpec, envelope: &Value) -> Result<Option<Effect>, MapError> {
    let text = source_value(a, col, envelope)?;
    let value = match (a.op, text) {
        (ColumnOp::Set, None) if !col.nullable => {
            return Err(MapError(format!(
                "null for non-nullable column {}",
                col.name
            )));
        }
        (ColumnOp::Set, text) => text,
        (ColumnOp::Append, text) => Some(format!("[{}]", text.as_deref().unwrap_or("null"))),
        (_, None) => return Ok(None),
        (ColumnOp::Merge, Some(text)) if !text.starts_with('{') => {
            return Err(MapError(format!(
                "merge into column {} needs a JSON object",
                col.name
            )));
        }
        (_, text) => text,
    };
    Ok(Some(Effect {
        op: a.op,
        ty: col.ty,
        value,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventplane_api::examples::orders as sample;
    use serde_json::json;

    fn envelope(ty: &str, data: Value) -> Value {
        json!({
            "type": ty,
            "streamId": "order-1",
            "streamVersion": 1,
            "position": 10,
            "recordedAt": "2024-05-01T10:00:00Z",
            "data": data,
            "metadata": {}
        })
    }

    /// The sample's columns set to the values.
    fn cols(pairs: &[(&str, Option<&str>)]) -> Patch {
        let spec = sample();
        pairs
            .iter()
            .map(|(k, v)| {
                let ty = spec.column(k).unwrap().ty;
                (k.to_string(), Effect::set(ty, v.map(str::to_string)))
            })
            .collect()
    }

    #[test]
    fn placed_maps_to_an_upsert_of_every_column() {
        let change = map_event(
            &sample(),
            &envelope(
                "OrderPlaced",
                json!({"orderId": "o1", "customerId": "c1", "total": 12.5}),
            ),
        )
        .unwrap()
        .unwrap();
        assert_eq!(change.key, "o1");
        assert_eq!(
            change.kind,
            ChangeKind::Upsert(cols(&[
                ("created_at", Some("2024-05-01T10:00:00Z")),
                ("customer_id", Some("c1")),
                ("status", Some("PENDING")),
                ("total", Some("12.5")),
                ("updated_at", Some("2024-05-01T10:00:00Z")),
            ]))
        );
    }

    #[test]
    fn paid_maps_to_an_update_and_cancelled_to_a_delete() {
        let s = sample();
        let paid = map_event(&s, &envelope("OrderPaid", json!({"orderId": "o1"})))
            .unwrap()
            .unwrap();
        assert_eq!(
            paid.kind,
            ChangeKind::Update(cols(&[
                ("status", Some("PAID")),
                ("updated_at", Some("2024-05-01T10:00:00Z")),
            ]))
        );
        let cancelled = map_event(&s, &envelope("OrderCancelled", json!({"orderId": "o1"})))
            .unwrap()
            .unwrap();
        assert_eq!(cancelled.kind, ChangeKind::Delete);
        assert_eq!(cancelled.key, "o1");
    }

    #[test]
    fn unhandled_event_types_are_ignored() {
        assert_eq!(
            map_event(&sample(), &envelope("Other", json!({}))).unwrap(),
            None
        );
    }

    #[test]
    fn json_null_becomes_sql_null_for_nullable_columns() {
        let change = map_event(
            &sample(),
            &envelope(
                "OrderPlaced",
                json!({"orderId": "o1", "customerId": "c1", "total": null}),
            ),
        )
        .unwrap()
        .unwrap();
        let ChangeKind::Upsert(c) = change.kind else {
            panic!("expected upsert")
        };
        assert_eq!(c["total"].value, None);
    }

    #[test]
    fn mapping_errors_name_pointer_and_column() {
        let s = sample();
        let e = map_event(&s, &envelope("OrderPaid", json!({}))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "missing value at /data/orderId for key column id"
        );
        let e = map_event(&s, &envelope("OrderPaid", json!({"orderId": null}))).unwrap_err();
        assert_eq!(e.to_string(), "/data/orderId: null for key column id");
        let e = map_event(&s, &envelope("OrderPaid", json!({"orderId": {"a": 1}}))).unwrap_err();
        assert_eq!(e.to_string(), "/data/orderId: expected text, got object");
        let e = map_event(
            &s,
            &envelope(
                "OrderPlaced",
                json!({"orderId": "o1", "customerId": "c1", "total": "abc"}),
            ),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/data/total: expected numeric, got string \"abc\""
        );
        let e = map_event(
            &s,
            &envelope("OrderPlaced", json!({"orderId": "o1", "total": 1})),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "missing value at /data/customerId for column customer_id"
        );
        let e = map_event(
            &s,
            &envelope(
                "OrderPlaced",
                json!({"orderId": "o1", "customerId": null, "total": 1}),
            ),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "null for non-nullable column customer_id");
        let e = map_event(&s, &json!({"data": {}})).unwrap_err();
        assert!(e.to_string().contains("type"));
    }

    #[test]
    fn keys_are_converted_to_the_key_type() {
        let mut s = sample();
        s.columns[0].ty = eventplane_api::ColumnType::Bigint;
        let change = map_event(&s, &envelope("OrderCancelled", json!({"orderId": "+42"})))
            .unwrap()
            .unwrap();
        assert_eq!(change.key, "42");
        let e = map_event(&s, &envelope("OrderCancelled", json!({"orderId": "x"}))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/data/orderId: expected bigint, got string \"x\""
        );
    }

    #[test]
    fn composite_keys_take_each_column_from_its_source_in_key_order() {
        use eventplane_api::KeySource;
        let mut s = sample();
        s.keys = vec!["customer_id".into(), "id".into()];
        s.key.clear();
        s.handlers[3].key.clear();
        // Listed out of key order: the key string follows `keys`.
        s.handlers[3].keys = vec![
            KeySource {
                column: "id".into(),
                from: None,
                from_first: vec!["/data/orderId".into(), "/data/order_id".into()],
            },
            KeySource {
                column: "customer_id".into(),
                from: Some("/data/customerId".into()),
                from_first: vec![],
            },
        ];
        let key = |data| {
            map_event(&s, &envelope("OrderCancelled", data))
                .map(|c| c.unwrap().key)
                .map_err(|e| e.to_string())
        };
        let expected = crate::key::encode(vec!["c1".into(), "o1".into()]);
        assert_eq!(
            key(json!({"orderId": "o1", "customerId": "c1"})),
            Ok(expected.clone())
        );
        // The old field name, and a null before it, fall through to it.
        assert_eq!(
            key(json!({"order_id": "o1", "customerId": "c1"})),
            Ok(expected.clone())
        );
        assert_eq!(
            key(json!({"orderId": null, "order_id": "o1", "customerId": "c1"})),
            Ok(expected)
        );
        assert_eq!(
            key(json!({"customerId": "c1"})),
            Err("missing value at /data/orderId, /data/order_id for key column id".into())
        );
        assert_eq!(
            key(json!({"orderId": "o1"})),
            Err("missing value at /data/customerId for key column customer_id".into())
        );
        assert_eq!(
            key(json!({"orderId": null, "customerId": "c1"})),
            Err("/data/orderId, /data/order_id: null for key column id".into())
        );
    }

    #[test]
    fn whole_envelope_fields_and_escaped_pointers_resolve() {
        let mut s = sample();
        s.handlers[3].key = "/data/a~1b".into();
        let change = map_event(&s, &envelope("OrderCancelled", json!({"a/b": "k"})))
            .unwrap()
            .unwrap();
        assert_eq!(change.key, "k");
        s.handlers[3].key = "/streamId".into();
        let change = map_event(&s, &envelope("OrderCancelled", json!({})))
            .unwrap()
            .unwrap();
        assert_eq!(change.key, "order-1");
    }

    #[test]
    fn renamed_fields_map_through_from_first_and_defaults() {
        let mut s = sample();
        s.handlers[0].event_type = String::new();
        s.handlers[0].event_types = vec!["OrderCreated".into(), "OrderPlaced".into()];
        let a = &mut s.handlers[0].set[1];
        a.from = None;
        a.from_first = vec!["/data/customerId".into(), "/data/customer/id".into()];
        s.handlers[0].set[2].default = Some("0".into());
        s.validate().unwrap();
        let mapped = |ty: &str, data: Value| map_event(&s, &envelope(ty, data));
        let old = mapped(
            "OrderCreated",
            json!({"orderId": "o1", "customer": {"id": "c9"}}),
        )
        .unwrap()
        .unwrap();
        let ChangeKind::Upsert(c) = old.kind else {
            panic!("expected upsert")
        };
        assert_eq!(c["customer_id"].value.as_deref(), Some("c9"));
        assert_eq!(c["total"].value.as_deref(), Some("0"), "the default");
        let new = mapped(
            "OrderPlaced",
            json!({"orderId": "o1", "customerId": "c1", "customer": {"id": "c9"}, "total": null}),
        )
        .unwrap()
        .unwrap();
        let ChangeKind::Upsert(c) = new.kind else {
            panic!("expected upsert")
        };
        assert_eq!(
            c["customer_id"].value.as_deref(),
            Some("c1"),
            "the first present"
        );
        assert_eq!(
            c["total"].value.as_deref(),
            Some("0"),
            "null takes the default too"
        );
        let e = mapped("OrderCreated", json!({"orderId": "o1"})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "missing value at /data/customerId, /data/customer/id for column customer_id"
        );
    }

    #[test]
    fn operations_map_to_effects_and_nulls_leave_them_out() {
        let yaml = r#"
apiVersion: eventplane.io/v1alpha1
kind: Projection
metadata: {name: stats}
spec:
  table: stats
  key: id
  columns:
    - {name: id, type: text}
    - {name: n, type: bigint}
    - {name: lo, type: numeric}
    - {name: tags, type: jsonb}
    - {name: attrs, type: jsonb}
  handlers:
    - eventType: E
      op: upsert
      key: /data/id
      when: "data.skip IS NULL"
      if: "n < 100"
      set:
        - {column: n, op: add}
        - {column: lo, op: min, from: /data/v}
        - {column: tags, op: append, from: /data/tag}
        - {column: attrs, op: merge, from: /data/attrs}
"#;
        let s = eventplane_api::load_manifests(yaml).unwrap().remove(0).spec;
        let change = map_event(
            &s,
            &envelope(
                "E",
                json!({"id": "k", "v": null, "tag": "t", "attrs": {"a": 1}}),
            ),
        )
        .unwrap()
        .unwrap();
        let ChangeKind::Upsert(c) = change.kind else {
            panic!("expected upsert")
        };
        assert_eq!(c["n"].op, ColumnOp::Add);
        assert_eq!(c["n"].value.as_deref(), Some("1"));
        assert!(!c.contains_key("lo"), "a null minimum changes nothing");
        assert_eq!(c["tags"].value.as_deref(), Some(r#"["t"]"#));
        assert_eq!(c["attrs"].value.as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(
            change.guard,
            Some(Guard {
                handler: 0,
                params: vec![Some("100".into())]
            })
        );
        let skipped = map_event(&s, &envelope("E", json!({"id": "k", "skip": 1}))).unwrap();
        assert_eq!(skipped, None, "when does not hold");
        let e = map_event(
            &s,
            &envelope("E", json!({"id": "k", "v": 1, "tag": 1, "attrs": [1]})),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "merge into column attrs needs a JSON object");
    }
}
