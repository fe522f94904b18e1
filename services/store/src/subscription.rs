//! What catch-up subscriptions read: the events after a cursor, in log
//! order `(tx_id, position)`, below the horizon (the projector's gap-safe
//! tail), of the types and the stream prefix a subscriber asked for. Every
//! statement a subscriber runs is here, and so is the cursor's text form.

use std::fmt;
use std::str::FromStr;

use sqlx::{PgConnection, PgExecutor};

use crate::batch::{TailEvent, horizon, tail_sql};
use crate::checkpoints::Checkpoint;

/// Which events a subscriber wants; `None` is no restriction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub event_types: Option<Vec<String>>,
    /// Matched literally (`%` and `_` are characters like any other).
    pub stream_prefix: Option<String>,
}

/// One page of a subscription's tail.
pub struct Page {
    pub events: Vec<TailEvent>,
    /// Where the next read starts: after the last event, or at the
    /// horizon when the page saw everything below it.
    pub next: Checkpoint,
    /// The horizon the page was read below.
    pub horizon: i64,
    /// The page is as long as asked: more events may be waiting.
    pub full: bool,
}

/// The events matching `filter` after `after` and below the horizon, at
/// most `limit`. The horizon is taken first, on the same connection: every
/// transaction below it had ended by then, so the read that follows sees
/// all of their events.
pub async fn read(
    conn: &mut PgConnection,
    after: Checkpoint,
    filter: &Filter,
    limit: i64,
) -> sqlx::Result<Page> {
    let horizon = horizon(&mut *conn).await?;
    // `starts_with` compares characters: the prefix needs no escaping.
    let events: Vec<TailEvent> = sqlx::query_as(tail_sql!(
        "AND ($4::text[] IS NULL OR event_type = ANY($4)) \
         AND ($5::text IS NULL OR starts_with(stream_id, $5))",
        "$6"
    ))
    .bind(after.tx_id.to_string())
    .bind(after.position)
    .bind(horizon.to_string())
    .bind(filter.event_types.as_deref())
    .bind(filter.stream_prefix.as_deref())
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let full = events.len() as i64 == limit;
    let next = after.after_batch(events.last().map(TailEvent::checkpoint), horizon, !full);
    Ok(Page {
        events,
        next,
        horizon,
        full,
    })
}

/// The log position of the event at global `position`, if there is one.
pub async fn checkpoint_at(
    conn: impl PgExecutor<'_>,
    position: i64,
) -> sqlx::Result<Option<Checkpoint>> {
    let tx_id: Option<i64> =
        sqlx::query_scalar("SELECT tx_id::text::bigint FROM events WHERE position = $1")
            .bind(position)
            .fetch_optional(conn)
            .await?;
    Ok(tx_id.map(|tx_id| Checkpoint { tx_id, position }))
}

/// A subscription cursor, `<tx_id>-<position>`: the log position of the
/// last event a subscriber got; it resumes strictly after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor(pub Checkpoint);

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0.tx_id, self.0.position)
    }
}

impl FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            format!(
                "invalid cursor {s:?}: expected the `id` of an event the subscription sent (<tx_id>-<position>)"
            )
        };
        let (tx, position) = s.split_once('-').ok_or_else(invalid)?;
        // Digits only: `parse` would take a sign.
        let number = |text: &str| {
            (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                .then(|| text.parse::<i64>().ok())
                .flatten()
                .ok_or_else(invalid)
        };
        Ok(Cursor(Checkpoint {
            tx_id: number(tx)?,
            position: number(position)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor(Checkpoint {
            tx_id: 812,
            position: 77,
        });
        assert_eq!(cursor.to_string(), "812-77");
        assert_eq!("812-77".parse::<Cursor>(), Ok(cursor));
    }

    #[test]
    fn malformed_cursors_are_rejected() {
        for bad in [
            "",
            "12",
            "-",
            "a-b",
            "1--2",
            "+1-2",
            "1-2-3",
            "1.2",
            "99999999999999999999-1",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad} should be rejected");
        }
    }
}
