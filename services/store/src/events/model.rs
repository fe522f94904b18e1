//! Append requests and results, and the validation of what clients send.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
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
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewEvent {
    #[serde(rename = "type")]
    pub event_type: String,
    // Kept as the client sent it: checked, then stored as it is, never
    // built into a tree and written out again (Postgres parses it into
    // `jsonb` anyway).
    /// The event's data: any JSON value.
    #[schema(value_type = Value)]
    pub data: Box<RawValue>,
    #[serde(default = "empty_object")]
    pub metadata: Value,
}

impl NewEvent {
    /// An event with `data` and no metadata.
    pub fn new(event_type: impl Into<String>, data: &Value) -> Self {
        NewEvent {
            event_type: event_type.into(),
            data: serde_json::value::to_raw_value(data).expect("a JSON value serializes"),
            metadata: empty_object(),
        }
    }
}

/// Events are equal when they say the same: `data` is compared as JSON,
/// not as text.
impl PartialEq for NewEvent {
    fn eq(&self, other: &Self) -> bool {
        self.event_type == other.event_type
            && self.metadata == other.metadata
            && (self.data.get() == other.data.get()
                || data_value(&self.data) == data_value(&other.data))
    }
}

/// `data` as a tree, for the rare paths that need one (an error's path, an
/// idempotency digest).
fn data_value(data: &RawValue) -> Value {
    serde_json::from_str(data.get()).expect("raw JSON holds valid JSON")
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

/// The code of JSON that does not parse; a 400, where other invalid input
/// is a 422.
pub const MALFORMED_JSON: &str = "malformed_json";

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
            // `data` came as raw text: what the parser did not check there
            // is checked here. Only an escaped NUL can be in JSON text; the
            // tree is built to name where only when the text holds one.
            let data = match check_raw(event.data.get(), DATA_DEPTH) {
                RawCheck::Storable => None,
                RawCheck::Nul => Some(data_value(&event.data)),
                RawCheck::LoneSurrogate(escape) => {
                    return Err(invalid(
                        MALFORMED_JSON,
                        format!(
                            "events[{i}].data holds {escape}, half of a UTF-16 surrogate pair without the other"
                        ),
                    ));
                }
                RawCheck::TooDeep => {
                    return Err(invalid(
                        MALFORMED_JSON,
                        format!(
                            "events[{i}].data nests arrays and objects deeper than a body's {MAX_DEPTH} levels"
                        ),
                    ));
                }
            };
            for (field, value) in [("data", data.as_ref()), ("metadata", Some(&event.metadata))] {
                if let Some(at) = value.and_then(|v| nul_at(v, &format!("events[{i}].{field}"))) {
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
        // `data` as a tree, so a retry that spaces its JSON differently is
        // the same request.
        let events: Vec<Value> = self
            .events
            .iter()
            .map(|e| serde_json::json!([e.event_type, data_value(&e.data), e.metadata]))
            .collect();
        let canonical = serde_json::json!([self.stream_id, self.expected_version, events]);
        Sha256::digest(canonical.to_string().as_bytes()).to_vec()
    }
}

/// What raw JSON text holds that the parser lets through in raw text but
/// a parsed value (and `jsonb`) refuses.
#[derive(Debug, PartialEq, Eq)]
enum RawCheck {
    Storable,
    /// `\u0000`.
    Nul,
    /// A UTF-16 surrogate without its other half, as an escape (`\ud800`).
    LoneSurrogate(String),
    /// Arrays and objects nested deeper than allowed.
    TooDeep,
}

/// Checks valid JSON text nested `depth` levels down in its document, which
/// may nest [`MAX_DEPTH`] levels at most, as a parsed body may.
fn check_raw(json: &str, mut depth: usize) -> RawCheck {
    let bytes = json.as_bytes();
    let hex = |at: usize| {
        bytes
            .get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let (mut nul, mut in_string, mut i) = (false, false, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => in_string = !in_string,
            b'[' | b'{' if !in_string => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return RawCheck::TooDeep;
                }
            }
            b']' | b'}' if !in_string => depth -= 1,
            // In valid JSON a backslash starts an escape inside a string.
            b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                let unit = hex(i + 2).unwrap_or(0xFFFF);
                let start = i;
                i += 6;
                match unit {
                    0 => nul = true,
                    0xD800..=0xDBFF => {
                        let low = (bytes.get(i..i + 2) == Some(b"\\u".as_slice()))
                            .then(|| hex(i + 2))
                            .flatten();
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return RawCheck::LoneSurrogate(json[start..i].to_string());
                        }
                        i += 6;
                    }
                    0xDC00..=0xDFFF => {
                        return RawCheck::LoneSurrogate(json[start..i].to_string());
                    }
                    _ => {}
                }
                continue;
            }
            b'\\' => i += 1,
            _ => {}
        }
        i += 1;
    }
    if nul {
        RawCheck::Nul
    } else {
        RawCheck::Storable
    }
}

/// Most arrays and objects nested in one request body: serde_json's own
/// limit (it refuses a 128th level), which raw text escapes.
const MAX_DEPTH: usize = 127;
/// The levels an append body nests an event's `data` in: the body, its
/// `events` array, the event.
const DATA_DEPTH: usize = 3;

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
    fn raw_text_is_checked_as_a_parsed_value_would_be() {
        let check = |json: &str| check_raw(json, 0);
        assert_eq!(check(r#"{"a":"x\u0000"}"#), RawCheck::Nul);
        assert_eq!(check(r#"{"a\u0000":1}"#), RawCheck::Nul);
        assert_eq!(check(r#"{"a":"\u00001"}"#), RawCheck::Nul);
        assert_eq!(check(r#""\\\u0000""#), RawCheck::Nul);
        assert_eq!(check(r#""\\u0000""#), RawCheck::Storable);
        assert_eq!(check(r#""u0000 \n \" [ { \u00e9""#), RawCheck::Storable);
        assert_eq!(check(r#""\ud83d\ude00""#), RawCheck::Storable);
        assert_eq!(
            check(r#"{"s":"\ud800"}"#),
            RawCheck::LoneSurrogate(r"\ud800".into())
        );
        assert_eq!(
            check(r#""\ud800\u0041""#),
            RawCheck::LoneSurrogate(r"\ud800".into())
        );
        assert_eq!(
            check(r#""\udc00""#),
            RawCheck::LoneSurrogate(r"\udc00".into())
        );
        let mut lone = request(json!([{"type": "A", "data": {}}]));
        lone.events[0].data = RawValue::from_string(r#"{"s":"\ud800"}"#.into()).unwrap();
        assert_eq!(lone.validate().unwrap_err().code, MALFORMED_JSON);
    }

    #[test]
    fn data_is_kept_as_sent() {
        let body: AppendBody = serde_json::from_str(
            r#"{"expectedVersion":"any","events":[{"type":"A","data":{ "b" : [1, 2.50] }}]}"#,
        )
        .unwrap();
        assert_eq!(body.events[0].data.get(), r#"{ "b" : [1, 2.50] }"#);
    }

    /// A body whose `data` nests `levels` arrays, checked as a raw event,
    /// and whether it parses as a plain value.
    fn nested(levels: usize) -> (Result<(), InvalidInput>, bool) {
        let body = format!(
            r#"{{"expectedVersion":"any","events":[{{"type":"A","data":{}{}}}]}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        );
        let parsed = serde_json::from_str::<Value>(&body).is_ok();
        let raw =
            serde_json::from_str::<AppendBody>(&body).map_err(|e| invalid("x", e.to_string()));
        let checked = raw.and_then(|body| {
            AppendRequest {
                stream_id: "s".into(),
                expected_version: body.expected_version,
                events: body.events,
                idempotency_key: None,
                traceparent: None,
            }
            .validate()
        });
        (checked, parsed)
    }

    #[test]
    fn raw_data_nests_exactly_as_deep_as_a_parsed_body_may() {
        for levels in 120..135 {
            let (checked, parsed) = nested(levels);
            assert_eq!(checked.is_ok(), parsed, "{levels} levels: {checked:?}");
        }
        assert_eq!(nested(400).0.unwrap_err().code, MALFORMED_JSON);
    }

    #[test]
    fn a_retry_spaced_differently_is_the_same_request() {
        let a = request(json!([{"type": "A", "data": {"n": 1}}]));
        let mut b = a.clone();
        b.events[0].data = RawValue::from_string("{ \"n\" : 1 }".into()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn digest_changes_with_the_events() {
        let a = request(json!([{"type": "A", "data": {"n": 1}}]));
        let b = request(json!([{"type": "A", "data": {"n": 2}}]));
        assert_eq!(a.digest(), a.clone().digest());
        assert_ne!(a.digest(), b.digest());
    }
}
