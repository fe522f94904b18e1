//! The relay's wire format, one message per event, written by the relay
//! and read by Kafka-fed projectors:
//! - key: the stream id (UTF-8), so one stream stays in one partition, in
//!   order;
//! - value: the event as JSON, `{"eventId", "type", "streamId",
//!   "streamVersion", "position", "txId", "recordedAt", "data",
//!   "metadata"}`;
//! - headers: `eventplane-position` (the global position, decimal),
//!   `eventplane-tx-id` (the writing transaction, decimal: with the
//!   position, the event's place in the log), `eventplane-event-id`
//!   (`<stream id>@<stream version>`, unique and stable),
//!   `eventplane-event-type`.

use eventplane_store::batch::TailEvent;
use eventplane_store::checkpoints::Checkpoint;
use eventplane_store::kafka_batch::Message as Decoded;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use serde::Deserialize;
use serde_json::{Value, json};

pub const HEADER_POSITION: &str = "eventplane-position";
pub const HEADER_TX_ID: &str = "eventplane-tx-id";
pub const HEADER_EVENT_ID: &str = "eventplane-event-id";
pub const HEADER_EVENT_TYPE: &str = "eventplane-event-type";

/// The value of an event's message.
pub fn value(event: &TailEvent) -> String {
    json!({
        "eventId": event_id(event),
        "type": event.event_type,
        "streamId": event.stream_id,
        "streamVersion": event.stream_version,
        "position": event.position,
        "txId": event.tx_id,
        "recordedAt": event.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": event.data,
        "metadata": event.metadata,
    })
    .to_string()
}

pub fn event_id(event: &TailEvent) -> String {
    format!("{}@{}", event.stream_id, event.stream_version)
}

/// The headers of an event's message.
pub fn headers(event: &TailEvent) -> OwnedHeaders {
    let (position, tx_id, id) = (
        event.position.to_string(),
        event.tx_id.to_string(),
        event_id(event),
    );
    OwnedHeaders::new_with_capacity(4)
        .insert(Header {
            key: HEADER_POSITION,
            value: Some(position.as_str()),
        })
        .insert(Header {
            key: HEADER_TX_ID,
            value: Some(tx_id.as_str()),
        })
        .insert(Header {
            key: HEADER_EVENT_ID,
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: HEADER_EVENT_TYPE,
            value: Some(event.event_type.as_str()),
        })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEvent {
    #[serde(rename = "type")]
    event_type: String,
    stream_id: String,
    stream_version: i64,
    position: i64,
    tx_id: i64,
    recorded_at: chrono::DateTime<chrono::Utc>,
    data: Value,
    #[serde(default)]
    metadata: Value,
}

/// A message as a projector applies it: the event, or, when the value does
/// not decode, a poison message named by its headers; `Err` when not even
/// the headers say which event it is (nothing can be recorded of it).
pub fn decode(message: &BorrowedMessage<'_>) -> Result<Decoded, String> {
    let decoded = message
        .payload()
        .ok_or_else(|| "the message has no value".to_string())
        .and_then(|bytes| serde_json::from_slice::<WireEvent>(bytes).map_err(|e| e.to_string()));
    match decoded {
        Ok(wire) => Ok(Decoded::Event(TailEvent {
            position: wire.position,
            tx_id: wire.tx_id,
            stream_id: wire.stream_id,
            stream_version: wire.stream_version,
            event_type: wire.event_type,
            data: wire.data,
            metadata: wire.metadata,
            recorded_at: wire.recorded_at,
        })),
        Err(reason) => {
            let number = |key| header(message, key).and_then(|v| v.parse::<i64>().ok());
            let (Some(position), Some(tx_id)) = (number(HEADER_POSITION), number(HEADER_TX_ID))
            else {
                return Err(reason);
            };
            Ok(Decoded::Poison {
                at: Checkpoint { tx_id, position },
                stream_id: message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                event_type: header(message, HEADER_EVENT_TYPE).unwrap_or_default(),
                reason: format!(
                    "undecodable Kafka message at {}/{}@{}: {reason}",
                    message.topic(),
                    message.partition(),
                    message.offset()
                ),
            })
        }
    }
}

fn header(message: &BorrowedMessage<'_>, key: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
