//! How a projection receives its events: from the Postgres log directly
//! (the tail, the default), or from the Kafka topic the outbox relay
//! publishes to, shared among projector replicas by partition.
//!
//! Kafka keeps order only within a partition, and the relay keys messages
//! by stream, so a row fed by one stream sees its events in order while a
//! row fed by several streams sees them in no global order. The rule that
//! keeps a Kafka-fed projection equal to the tail's: a handler either keys
//! its rows by the stream (`/streamId`, alone or as one column of a
//! composite key), or only does what commutes (`upsert` with `add`, `min`
//! and `max`, no `if`). [`check`] enforces it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::types::{ColumnOp, ErrorPolicy, HandlerSpec, Op, ProjectionSpec};

/// The topic the relay publishes to unless told otherwise.
pub const DEFAULT_TOPIC: &str = "eventplane.events";

/// The envelope pointer that names the stream.
const STREAM_KEY: &str = "/streamId";

fn default_topic() -> String {
    DEFAULT_TOPIC.to_string()
}

/// Where the projector reads a projection's events from.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransportSpec {
    /// `postgres` (default): the projector tails the event log.
    /// `kafka`: projector replicas started with `--source kafka` consume
    /// the relay's topic in one consumer group per projection, a partition
    /// each at most.
    #[serde(default)]
    pub kind: TransportKind,
    /// The topic the relay publishes to (default `eventplane.events`);
    /// only for `kafka`.
    #[serde(default = "default_topic")]
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The projector tails the Postgres event log.
    #[default]
    Postgres,
    /// Consumer-group projectors read the relay's Kafka topic.
    Kafka,
}

impl TransportSpec {
    pub fn is_kafka(&self) -> bool {
        self.kind == TransportKind::Kafka
    }
}

/// Kafka topic names: ASCII letters, digits, `.`, `_` and `-`, at most
/// 249 characters.
fn check_topic(topic: &str) -> Result<(), SpecError> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(SpecError::invalid(
            "spec.transport.topic",
            format!(
                "{topic:?} is not a Kafka topic name: 1 to 249 ASCII letters, digits, '.', '_' or '-'"
            ),
        ))
    }
}

/// Whether every row `handler` writes is fed by one stream only.
fn keyed_by_stream(handler: &HandlerSpec) -> bool {
    handler.key == STREAM_KEY
        || handler
            .keys
            .iter()
            .any(|k| k.pointers().next() == Some(STREAM_KEY))
}

/// What a handler of rows fed by several streams does that depends on the
/// order of their events, if anything.
fn order_dependence(handler: &HandlerSpec) -> Option<String> {
    if handler.op != Op::Upsert {
        return Some(format!("`op: {}`", spelled(&handler.op)));
    }
    if handler.guard.is_some() {
        return Some("an `if` condition".to_string());
    }
    handler
        .set
        .iter()
        .find(|a| !matches!(a.op, ColumnOp::Add | ColumnOp::Min | ColumnOp::Max))
        .map(|a| format!("column {:?} with `op: {}`", a.column, spelled(&a.op)))
}

/// A spec enum as users write it.
fn spelled(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Checks that `spec` can run on its transport.
pub fn check(spec: &ProjectionSpec) -> Result<(), SpecError> {
    let Some(transport) = &spec.transport else {
        return Ok(());
    };
    if !transport.is_kafka() {
        return Ok(());
    }
    check_topic(&transport.topic)?;
    if spec.on_error == ErrorPolicy::Halt {
        return Err(SpecError::invalid(
            "spec.onError",
            "a Kafka-fed projection cannot halt: its partitions are applied independently, so \
             which events precede a halting one is not defined; use deadLetter",
        ));
    }
    for (i, handler) in spec.handlers.iter().enumerate() {
        if keyed_by_stream(handler) {
            continue;
        }
        if let Some(what) = order_dependence(handler) {
            return Err(SpecError::invalid(
                format!("spec.handlers[{i}]"),
                format!(
                    "a Kafka-fed projection receives the events of a row keyed by something other \
                     than /streamId from several partitions, in no global order; such a handler may \
                     only `upsert` with `add`, `min` or `max`, but this one has {what}. Key it by \
                     /streamId or use transport kind postgres"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Assignment, KeySource, load_manifests};

    fn kafka(mut spec: ProjectionSpec) -> ProjectionSpec {
        spec.transport = Some(TransportSpec {
            kind: TransportKind::Kafka,
            topic: DEFAULT_TOPIC.into(),
        });
        spec
    }

    fn customer_stats() -> ProjectionSpec {
        let yaml = include_str!("../examples/customer_stats.yaml");
        load_manifests(yaml).unwrap().remove(0).spec
    }

    fn add(column: &str) -> Assignment {
        Assignment {
            column: column.into(),
            op: ColumnOp::Add,
            from: None,
            from_first: vec![],
            default: None,
            value: None,
        }
    }

    /// The orders sample (upsert, update, delete, `if`) keyed by stream.
    fn orders_by_stream() -> ProjectionSpec {
        let mut spec = crate::examples::orders();
        for handler in &mut spec.handlers {
            handler.key = STREAM_KEY.into();
        }
        kafka(spec)
    }

    #[test]
    fn stream_keyed_specs_may_do_anything() {
        let spec = orders_by_stream();
        assert!(spec.handlers.iter().all(keyed_by_stream));
        spec.validate().unwrap();
        // Keyed by a data field, the same handlers are order-dependent.
        let err = kafka(crate::examples::orders())
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("spec.handlers[0]: "), "{err}");
    }

    #[test]
    fn a_stream_column_of_a_composite_key_keeps_rows_on_one_stream() {
        let mut handler = crate::examples::orders().handlers.remove(0);
        handler.key.clear();
        handler.keys = vec![
            KeySource {
                column: "tenant".into(),
                from: Some("/metadata/tenant".into()),
                from_first: vec![],
            },
            KeySource {
                column: "id".into(),
                from: Some(STREAM_KEY.into()),
                from_first: vec![],
            },
        ];
        assert!(keyed_by_stream(&handler));
        handler.keys[1].from = None;
        handler.keys[1].from_first = vec!["/data/id".into(), STREAM_KEY.into()];
        assert!(!keyed_by_stream(&handler), "/data/id may win");
    }

    #[test]
    fn rows_fed_by_several_streams_take_only_commutative_upserts() {
        // customer_stats keeps the first order's time with setIfNull,
        // which depends on which partition is applied first.
        let err = kafka(customer_stats()).validate().unwrap_err().to_string();
        assert!(err.starts_with("spec.handlers[0]: "), "{err}");
        assert!(
            err.contains("\"first_order_at\" with `op: setIfNull`"),
            "{err}"
        );

        let mut spec = customer_stats();
        spec.handlers[0].set[2].op = ColumnOp::Min;
        kafka(spec.clone()).validate().unwrap();

        let mut guarded = spec.clone();
        guarded.handlers[0].guard = Some("orders_placed < 10".into());
        let err = kafka(guarded).validate().unwrap_err().to_string();
        assert!(err.contains("an `if` condition"), "{err}");

        let mut update = spec.clone();
        update.handlers[0].op = Op::Update;
        let err = kafka(update).validate().unwrap_err().to_string();
        assert!(err.contains("`op: update`"), "{err}");

        let mut counter = spec;
        counter.handlers[0].set = vec![add("orders_placed")];
        kafka(counter.clone()).validate().unwrap();
        // The same spec on the Postgres tail may do anything.
        customer_stats().validate().unwrap();
    }

    #[test]
    fn halting_and_bad_topics_are_refused() {
        let mut spec = orders_by_stream();
        spec.on_error = ErrorPolicy::Halt;
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .starts_with("spec.onError: ")
        );
        for bad in ["", "a b", "..", "ünicode", &"t".repeat(250)] {
            let mut spec = orders_by_stream();
            spec.transport.as_mut().unwrap().topic = bad.to_string();
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.starts_with("spec.transport.topic: "), "{bad:?}: {err}");
        }
        let mut spec = orders_by_stream();
        spec.transport.as_mut().unwrap().topic = "orders.v1_events-2".into();
        spec.validate().unwrap();
    }

    #[test]
    fn the_manifest_form_defaults_the_topic() {
        let yaml = include_str!("../examples/orders.yaml")
            .replace("spec:\n", "spec:\n  transport: {kind: kafka}\n");
        let spec = load_manifests(&yaml).unwrap_err().to_string();
        assert!(spec.contains("transport kind postgres"), "{spec}");
        let yaml = include_str!("../examples/customer_stats.yaml")
            .replace("spec:\n", "spec:\n  transport: {kind: kafka}\n")
            .replace("op: setIfNull", "op: min");
        let spec = load_manifests(&yaml).unwrap().remove(0).spec;
        assert_eq!(spec.kafka_topic(), Some(DEFAULT_TOPIC));
        assert_eq!(crate::examples::orders().kafka_topic(), None);
    }
}
