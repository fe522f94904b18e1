//! One batch of a Kafka-fed projection, in one transaction: hold the live
//! checkpoint (shared, so batches of other partitions run beside it, and a
//! swap waits), lock the partitions' offset rows, drop what was applied
//! already, map and fold the rest, write the rows, record dead letters and
//! advance the offsets. A crash at any point rolls all of it back.
//!
//! What was applied already, per partition:
//! - a message below the row's `next_offset`: Kafka delivered it again;
//! - an event at or before the partition's last applied coordinate, or at
//!   or before the live checkpoint (where a rebuild swapped in a version
//!   built from the Postgres log): the relay published it again.

use std::sync::Arc;

use crate::batch::{TailEvent, follow_active, prepare, write_rows};
use crate::checkpoints::{self, Checkpoint, DeadLetter};
use crate::kafka_offsets::{self, Step};
use crate::projection::Projection;
use sqlx::PgPool;

/// A message as the consumer read it.
#[derive(Debug, Clone)]
pub enum Message {
    Event(TailEvent),
    /// Its value does not decode, but its headers name the event: it is
    /// dead-lettered, and a replay reads the event from the log.
    Poison {
        at: Checkpoint,
        stream_id: String,
        /// Empty when the headers do not say.
        event_type: String,
        reason: String,
    },
    /// Names no event at all: nothing can be recorded of it, and the
    /// offset moves past it.
    Unreadable,
}

impl Message {
    /// Its place in the log, when it names an event.
    fn at(&self) -> Option<Checkpoint> {
        match self {
            Message::Event(event) => Some(event.checkpoint()),
            Message::Poison { at, .. } => Some(*at),
            Message::Unreadable => None,
        }
    }

    /// Whether `projection` applies it: the tail reads only the event
    /// types of its handlers.
    fn wanted_by(&self, projection: &Projection) -> bool {
        let event_type = match self {
            Message::Event(event) => &event.event_type,
            Message::Poison { event_type, .. } if !event_type.is_empty() => event_type,
            Message::Poison { .. } => return true,
            Message::Unreadable => return false,
        };
        projection.spec.handler(event_type).is_some()
    }
}

/// One partition's messages of a batch, in offset order.
#[derive(Debug, Clone)]
pub struct PartitionBatch {
    pub partition: i32,
    pub messages: Vec<(i64, Message)>,
    /// The first offset the broker returned when asked for the stored
    /// one: the offsets between do not exist (compaction, transaction
    /// markers, retention), so the messages may start there.
    pub resume_at: Option<i64>,
}

/// A partition read from past where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub partition: i32,
    /// The first offset not applied yet.
    pub stored: i64,
    /// The first offset the batch held.
    pub found: i64,
}

#[derive(Debug, Default)]
pub struct KafkaOutcome {
    /// Events applied or dead-lettered.
    pub events: usize,
    /// Messages the relay had published before.
    pub duplicates: usize,
    /// Messages Kafka had delivered before.
    pub redelivered: usize,
    pub keys: Vec<String>,
    pub dead_letters: usize,
    pub max_lag_seconds: f64,
    pub traceparents: Vec<String>,
    /// Partitions whose messages did not start at the stored offset: the
    /// consumer must read them again from the stored offset given (nothing
    /// of them was applied), with the first offset it had read.
    pub gaps: Vec<Gap>,
    /// The next offset of every partition applied, to commit to Kafka.
    pub next_offsets: Vec<(i32, i64)>,
}

/// Applies one batch of `topic`'s messages to `projection`.
pub async fn apply(
    pool: &PgPool,
    projection: &mut Arc<Projection>,
    topic: &str,
    mut batches: Vec<PartitionBatch>,
) -> sqlx::Result<KafkaOutcome> {
    batches.sort_by_key(|b| b.partition);
    let mut tx = pool.begin().await?;
    let Some(live) = checkpoints::lock_shared(&mut tx, &projection.name).await? else {
        return Err(sqlx::Error::RowNotFound);
    };
    follow_active(&mut tx, projection).await?;
    let floor = live.at();
    let partitions: Vec<i32> = batches.iter().map(|b| b.partition).collect();
    let stored = kafka_offsets::lock(&mut tx, &projection.name, topic, &partitions).await?;

    let mut outcome = KafkaOutcome::default();
    let mut events = Vec::new();
    let mut poison = Vec::new();
    let mut steps = Vec::new();
    for batch in batches {
        let Some(row) = stored.get(&batch.partition) else {
            continue;
        };
        let fresh = sift(batch, row.next_offset, floor.max(row.at()), &mut outcome);
        let Some(fresh) = fresh else {
            continue;
        };
        outcome.duplicates += fresh.duplicates;
        let mut step = Step {
            partition: fresh.partition,
            next_offset: fresh.next_offset,
            at: row.at(),
            applied: 0,
            duplicates: fresh.duplicates as i64,
            last_event_at: None,
        };
        for message in fresh.messages {
            if let Some(at) = message.at() {
                step.at = step.at.max(at);
            }
            if !message.wanted_by(projection) {
                continue;
            }
            step.applied += 1;
            match message {
                Message::Event(event) => {
                    step.last_event_at = Some(event.recorded_at);
                    events.push(event);
                }
                Message::Poison {
                    at,
                    stream_id,
                    event_type,
                    reason,
                } => poison.push(DeadLetter {
                    position: at.position,
                    tx_id: at.tx_id,
                    stream_id,
                    event_type,
                    reason,
                }),
                Message::Unreadable => {}
            }
        }
        outcome
            .next_offsets
            .push((step.partition, step.next_offset));
        steps.push(step);
    }

    let mut prepared = prepare(projection, &events, i64::MAX);
    for letter in poison {
        prepared.dead_letter(letter);
    }
    let written = write_rows(&mut tx, projection, prepared).await?;
    kafka_offsets::advance(&mut tx, &projection.name, topic, &steps).await?;
    tx.commit().await?;

    outcome.events = written.events;
    outcome.max_lag_seconds = written.max_lag_seconds();
    outcome.keys = written.keys;
    outcome.dead_letters = written.dead_letters;
    outcome.traceparents = written.traceparents;
    Ok(outcome)
}

/// A partition's messages that are new, once what was applied is dropped.
struct Fresh {
    partition: i32,
    messages: Vec<Message>,
    next_offset: i64,
    duplicates: usize,
}

/// Drops what `outcome` counts as redelivered (below `next_offset`) or
/// duplicated (at or before `applied`); `None` when nothing is left, or
/// when the messages skip offsets after `next_offset` (recorded as a gap).
fn sift(
    batch: PartitionBatch,
    next_offset: i64,
    applied: Checkpoint,
    outcome: &mut KafkaOutcome,
) -> Option<Fresh> {
    let mut expected = next_offset;
    let mut fresh = Fresh {
        partition: batch.partition,
        messages: Vec::new(),
        next_offset,
        duplicates: 0,
    };
    let mut last = applied;
    for (offset, message) in batch.messages {
        if offset < expected {
            outcome.redelivered += 1;
            continue;
        }
        if offset > expected && expected == next_offset && batch.resume_at != Some(offset) {
            // The consumer started past the stored offset (it fetched
            // ahead before a rebalance, or its committed offset is ahead):
            // apply nothing of this partition until it reads from there.
            outcome.gaps.push(Gap {
                partition: batch.partition,
                stored: next_offset,
                found: offset,
            });
            return None;
        }
        // Within a batch, offsets a broker skips (transaction markers,
        // compaction) are not gaps in what was delivered.
        expected = offset + 1;
        fresh.next_offset = expected;
        match message.at() {
            Some(at) if at <= last => {
                fresh.duplicates += 1;
                continue;
            }
            Some(at) => last = at,
            None => {}
        }
        fresh.messages.push(message);
    }
    (fresh.next_offset > next_offset).then_some(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tx_id: i64, position: i64) -> Message {
        Message::Event(TailEvent {
            position,
            tx_id,
            stream_id: "s".into(),
            stream_version: position,
            event_type: "E".into(),
            data: serde_json::json!({}),
            metadata: serde_json::json!({}),
            recorded_at: chrono::Utc::now(),
        })
    }

    fn at(tx_id: i64, position: i64) -> Checkpoint {
        Checkpoint { tx_id, position }
    }

    fn positions(fresh: &Fresh) -> Vec<i64> {
        fresh
            .messages
            .iter()
            .filter_map(|m| m.at())
            .map(|at| at.position)
            .collect()
    }

    #[test]
    fn redelivered_offsets_and_republished_events_are_dropped() {
        // Offsets 0-1 were applied (last event (10, 2)); the relay then
        // crashed and published (10, 2) again at offset 2.
        let batch = PartitionBatch {
            partition: 3,
            messages: vec![
                (0, event(10, 1)),
                (1, event(10, 2)),
                (2, event(10, 2)),
                (3, event(11, 3)),
                (4, event(12, 4)),
            ],
            resume_at: None,
        };
        let mut outcome = KafkaOutcome::default();
        let fresh = sift(batch, 2, at(10, 2), &mut outcome).unwrap();
        assert_eq!(positions(&fresh), [3, 4]);
        assert_eq!(fresh.next_offset, 5);
        assert_eq!((outcome.redelivered, fresh.duplicates), (2, 1));
        assert!(outcome.gaps.is_empty());
    }

    #[test]
    fn a_batch_starting_past_the_stored_offset_applies_nothing() {
        let batch = PartitionBatch {
            partition: 1,
            messages: vec![(7, event(20, 7)), (8, event(20, 8))],
            resume_at: None,
        };
        let mut outcome = KafkaOutcome::default();
        assert!(sift(batch.clone(), 5, at(0, 0), &mut outcome).is_none());
        let gap = Gap {
            partition: 1,
            stored: 5,
            found: 7,
        };
        assert_eq!(outcome.gaps, [gap]);
        // Asked for offset 5, the broker answered with 7: 5 and 6 do not
        // exist.
        let resumed = PartitionBatch {
            resume_at: Some(7),
            ..batch
        };
        let mut outcome = KafkaOutcome::default();
        let fresh = sift(resumed, 5, at(0, 0), &mut outcome).unwrap();
        assert_eq!(positions(&fresh), [7, 8]);
        assert!(outcome.gaps.is_empty());
    }

    #[test]
    fn everything_at_or_before_the_floor_counts_as_applied() {
        // A swap put the live checkpoint at (30, 0): the rebuilt version
        // holds every event published before.
        let batch = PartitionBatch {
            partition: 0,
            messages: vec![(0, event(29, 5)), (1, event(30, 9)), (2, event(31, 1))],
            resume_at: None,
        };
        let mut outcome = KafkaOutcome::default();
        let fresh = sift(batch, 0, at(30, 9), &mut outcome).unwrap();
        assert_eq!(positions(&fresh), [1]);
        assert_eq!((fresh.next_offset, fresh.duplicates), (3, 2));
    }

    #[test]
    fn an_unreadable_message_moves_the_offset_past_it() {
        let batch = PartitionBatch {
            partition: 0,
            messages: vec![(4, Message::Unreadable), (5, event(3, 1))],
            resume_at: None,
        };
        let mut outcome = KafkaOutcome::default();
        let fresh = sift(batch, 4, at(2, 9), &mut outcome).unwrap();
        assert_eq!(positions(&fresh), [1]);
        assert_eq!(fresh.next_offset, 6);
    }

    #[test]
    fn a_batch_of_only_old_offsets_leaves_the_row_alone() {
        let batch = PartitionBatch {
            partition: 0,
            messages: vec![(0, event(1, 1)), (1, event(1, 2))],
            resume_at: None,
        };
        let mut outcome = KafkaOutcome::default();
        assert!(sift(batch, 2, at(1, 2), &mut outcome).is_none());
        assert_eq!(outcome.redelivered, 2);
    }
}
