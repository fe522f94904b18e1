//! Append requests and results, and the validation of what clients send.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Most events one append may carry; larger imports should be split.
pub const MAX_EVENTS_PER_APPEND: usize = 1000;

/// What the stream's version must be for an append to go in: a number
/// (the stream's version, 0 for none), `"any"` or `"no_stream"`. In JSON it
/// is written as the client wrote it, so a 409 answers in kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ExpectedVersion {
    Exact(i64),
    Named(NamedVersion),
}

const EXPECTED_VERSION: &str = r#"a stream version (an integer >= 0), "any" or "no_stream""#;

/// Hand-written so a bad value is named in the client's terms, not after
/// the Rust types behind it.
impl<'de> Deserialize<'de> for ExpectedVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ExpectedVersion;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(EXPECTED_VERSION)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ExpectedVersion, E> {
                Ok(ExpectedVersion::Exact(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ExpectedVersion, E> {
                i64::try_from(v)
                    .map(ExpectedVersion::Exact)
                    .map_err(|_| E::custom(format!("expectedVersion {v} is out of range")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ExpectedVersion, E> {
                match v {
                    "any" => Ok(ExpectedVersion::Named(NamedVersion::Any)),
                    "no_stream" => Ok(ExpectedVersion::Named(NamedVersion::NoStream)),
                    other => Err(E::custom(format!(
                        "expectedVersion {other:?} is not {EXPECTED_VERSION}"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NamedVersion {
    Any,
    NoStream,
}

impl ExpectedVersion {
    /// Whether a stream at `actual` (0 = no events) satisfies the expectation.
    pub fn admits(&self, actual: i64) -> bool {
        match self {
            ExpectedVersion::Exact(v) => *v == actual,
            ExpectedVersion::Named(NamedVersion::Any) => true,
            ExpectedVersion::Named(NamedVersion::NoStream) => actual == 0,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ExpectedVersion::Exact(v) => v.to_string(),
            ExpectedVersion::Named(NamedVersion::Any) => "any".into(),
            ExpectedVersion::Named(NamedVersion::NoStream) => "no_stream".into(),
        }
    }
}

/// One event to append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewEvent {
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
    #[serde(default = "empty_object")]
    pub metadata: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// The body of `POST /v1/streams/{stream}/events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppendBody {
    pub expected_version: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppendRequest {
    pub stream_id: String,
    pub expected_version: ExpectedVersion,
    pub events: Vec<NewEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The W3C trace context of the command, stored in every event's
    /// metadata under `traceparent` so the projector's span can join the
    /// command's trace. Not part of the request's identity: a retry under
    /// the same idempotency key comes with a trace of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A committed append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppendResult {
    pub stream_id: String,
    /// The stream's version after the append (= number of events in it).
    pub version: i64,
    /// Global positions of the appended events, in order.
    pub positions: Vec<i64>,
    /// Pass as `?token=` to a query to read your own write.
    pub token: String,
}

/// Which input was wrong, for a 4xx answer naming it.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidInput {
    pub code: &'static str,
    pub message: String,
}

fn invalid(code: &'static str, message: String) -> InvalidInput {
    InvalidInput { code, message }
}

pub fn validate_stream_id(stream_id: &str) -> Result<(), InvalidInput> {
    let ok = (1..=200).contains(&stream_id.len())
        && stream_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && stream_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "invalid_stream_id",
            format!(
                "stream id {stream_id:?} must be 1-200 characters of letters, digits and _ . : @ -, starting with a letter or digit"
            ),
        ))
    }
}

pub fn validate_event_type(event_type: &str) -> bool {
    (1..=128).contains(&event_type.len())
        && event_type
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
        && event_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
}

pub fn validate_idempotency_key(key: &str) -> Result<(), InvalidInput> {
    if (1..=200).contains(&key.len()) && key.chars().all(|c| c.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(invalid(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-200 visible ASCII characters".into(),
        ))
    }
}

impl AppendRequest {
    pub fn validate(&self) -> Result<(), InvalidInput> {
        validate_stream_id(&self.stream_id)?;
        if let Some(key) = &self.idempotency_key {
            validate_idempotency_key(key)?;
        }
        if let ExpectedVersion::Exact(v) = self.expected_version
            && v < 0
        {
            return Err(invalid(
                "invalid_expected_version",
                format!("expectedVersion must be >= 0, \"any\" or \"no_stream\", got {v}"),
            ));
        }
        if self.events.is_empty() {
            return Err(invalid(
                "no_events",
                "events must hold at least one event".into(),
            ));
        }
        if self.events.len() > MAX_EVENTS_PER_APPEND {
            return Err(invalid(
                "too_many_events",
                format!(
                    "an append carries at most {MAX_EVENTS_PER_APPEND} events, got {}",
                    self.events.len()
                ),
            ));
        }
        for (i, event) in self.events.iter().enumerate() {
            if !validate_event_type(&event.event_type) {
                return Err(invalid(
                    "invalid_event_type",
                    format!(
                        "events[{i}].type {:?} must be 1-128 characters of letters, digits and _ . : -, starting with a letter",
                        event.event_type
                    ),
                ));
            }
            if !event.metadata.is_object() {
                return Err(invalid(
                    "invalid_metadata",
                    format!("events[{i}].metadata must be a JSON object"),
                ));
            }
            for (field, value) in [("data", &event.data), ("metadata", &event.metadata)] {
                if let Some(at) = nul_at(value, &format!("events[{i}].{field}")) {
                    return Err(invalid(
                        "unstorable_value",
                        format!("{at} holds a NUL character (\\u0000), which cannot be stored"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A digest of everything that makes two requests "the same" for
    /// idempotency: a reused key with a different request is refused.
    pub fn digest(&self) -> Vec<u8> {
        let canonical = serde_json::json!([self.stream_id, self.expected_version, self.events]);
        Sha256::digest(canonical.to_string().as_bytes()).to_vec()
    }
}

/// Where in `value` a string or an object key holds a NUL character
/// (`jsonb` refuses them), as a path below `at`.
fn nul_at(value: &Value, at: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(at.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_at(item, &format!("{at}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                Some(format!("{at} (a key)"))
            } else {
                nul_at(item, &format!("{at}.{key}"))
            }
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(events: Value) -> AppendRequest {
        AppendRequest {
            stream_id: "order-1".into(),
            expected_version: ExpectedVersion::Named(NamedVersion::Any),
            events: serde_json::from_value(events).unwrap(),
            idempotency_key: None,
            traceparent: None,
        }
    }

    #[test]
    fn expected_version_parses_numbers_and_names() {
        let body: AppendBody =
            serde_json::from_value(json!({"expectedVersion": 3, "events": []})).unwrap();
        assert_eq!(body.expected_version, ExpectedVersion::Exact(3));
        let body: AppendBody =
            serde_json::from_value(json!({"expectedVersion": "no_stream", "events": []})).unwrap();
        assert_eq!(
            body.expected_version,
            ExpectedVersion::Named(NamedVersion::NoStream)
        );
        assert!(
            serde_json::from_value::<AppendBody>(
                json!({"expectedVersion": "latest", "events": []})
            )
            .is_err()
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_value::<AppendBody>(
            json!({"expectedVersion": 1, "events": [], "extra": 1}),
        );
        assert!(err.is_err());
    }

    #[test]
    fn expectations_admit_the_right_versions() {
        assert!(ExpectedVersion::Named(NamedVersion::NoStream).admits(0));
        assert!(!ExpectedVersion::Named(NamedVersion::NoStream).admits(1));
        assert!(ExpectedVersion::Named(NamedVersion::Any).admits(7));
        assert!(ExpectedVersion::Exact(2).admits(2));
        assert!(!ExpectedVersion::Exact(2).admits(3));
    }

    #[test]
    fn validation_names_the_bad_input() {
        assert_eq!(request(json!([])).validate().unwrap_err().code, "no_events");
        let bad_type = request(json!([{"type": "9lives", "data": {}}]));
        assert_eq!(bad_type.validate().unwrap_err().code, "invalid_event_type");
        let bad_meta = request(json!([{"type": "A", "data": {}, "metadata": 3}]));
        assert_eq!(bad_meta.validate().unwrap_err().code, "invalid_metadata");
        let mut bad_stream = request(json!([{"type": "A", "data": {}}]));
        bad_stream.stream_id = "has space".into();
        assert_eq!(bad_stream.validate().unwrap_err().code, "invalid_stream_id");
        let ok = request(json!([{"type": "OrderPlaced", "data": {"a": 1}}]));
        assert_eq!(ok.validate(), Ok(()));
        let nul = request(json!([{"type": "A", "data": {"a": [1, "x\u{0}y"]}}]));
        let err = nul.validate().unwrap_err();
        assert_eq!(err.code, "unstorable_value");
        assert!(
            err.message.starts_with("events[0].data.a[1] "),
            "{}",
            err.message
        );
        let nul_key = request(json!([{"type": "A", "data": {}, "metadata": {"k\u{0}": 1}}]));
        assert!(
            nul_key
                .validate()
                .unwrap_err()
                .message
                .contains("events[0].metadata (a key)")
        );
    }

    #[test]
    fn digest_changes_with_the_events() {
        let a = request(json!([{"type": "A", "data": {"n": 1}}]));
        let b = request(json!([{"type": "A", "data": {"n": 2}}]));
        assert_eq!(a.digest(), a.clone().digest());
        assert_ne!(a.digest(), b.digest());
    }
}
