//! Catch-up subscriptions over Server-Sent Events: `GET
//! /v1/subscriptions/events` streams the committed events of the log in
//! log order from a cursor on, then follows the log as it grows.
//!
//! Each subscriber has a task of its own (the producer) that reads the
//! projector's gap-safe tail on the primary in pages, only when its
//! bounded buffer has room for one, and a response body (the outlet) that
//! drains the buffer. Caught up, the producer waits for `NOTIFY
//! eventplane_events` (one listening connection per process, opened when
//! the first subscriber comes), polling as a fallback: the horizon can
//! move without a notification when a transaction holding it back ends.
//!
//! A subscriber whose buffer has had no room for a page for the stall
//! timeout is cut off: a final `event: error` (`slow_consumer`) is queued
//! ahead of what it has not taken, and its connection is dropped at the
//! next write it does not take. At most `max_subscribers` stream from one
//! process; more answer 503 `too_many_subscribers`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use eventplane_store::ErrorBody;
use eventplane_store::batch::{TailEvent, events_beyond};
use eventplane_store::checkpoints::Checkpoint;
use eventplane_store::db;
use eventplane_store::error_body::ErrorResponse;
use eventplane_store::events::model::validate_event_type;
use eventplane_store::events::notify::CHANNEL;
use eventplane_store::subscription::{self, Cursor, Filter};
use futures::Stream;
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::QueryService;
use crate::api_error::{ApiError, ApiResult};
use crate::auth::{Access, Grants};
use crate::conn::Connection;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// An SSE comment (`: heartbeat`) goes out this often while no event
    /// does, so proxies keep the connection and clients see it is alive.
    pub heartbeat: Duration,
    /// Subscribers one process streams to at once; more answer 503.
    pub max_subscribers: usize,
    /// Events waiting for one subscriber, at most.
    pub buffer: usize,
    /// A subscriber whose buffer has had no room for a page this long is
    /// cut off.
    pub stall_timeout: Duration,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            max_subscribers: 256,
            buffer: 1000,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Most events one read takes: a page, as the projector's batches are.
const PAGE: usize = 500;
/// Caught up with nothing held back: poll this often even without a
/// notification (one missed while the listener reconnects).
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// While a running transaction holds newer events back, look again this
/// soon, backing off to `MAX_BEHIND_WAIT` (as the projector does).
const MIN_BEHIND_WAIT: Duration = Duration::from_millis(1);
const MAX_BEHIND_WAIT: Duration = Duration::from_millis(50);
/// Pause after a read the database refused.
const RETRY: Duration = Duration::from_secs(1);
/// Most event types one subscription names.
const MAX_TYPES: usize = 64;
/// A stream id is at most 200 bytes, so a longer prefix matches nothing.
const MAX_PREFIX_BYTES: usize = 200;
const PARAMETERS: [&str; 3] = ["from", "types", "streamPrefix"];

/// One process's subscriptions: admission, and the notifications that
/// wake every caught-up subscriber.
pub struct Subscriptions {
    config: SubscriptionConfig,
    pool: PgPool,
    slots: Arc<Semaphore>,
    wake: watch::Receiver<u64>,
    /// Raised by each subscriber; the listener starts at the first.
    wanted: Arc<Notify>,
}

impl Subscriptions {
    /// The subscriptions reading `pool` (the primary: the horizon and the
    /// notifications are the primary's), and the task that forwards the
    /// notifications, which runs until aborted.
    pub fn new(
        pool: PgPool,
        config: SubscriptionConfig,
    ) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static) {
        let (wake_tx, wake) = watch::channel(0u64);
        let wanted = Arc::new(Notify::new());
        let forward = {
            let (pool, wanted) = (pool.clone(), wanted.clone());
            async move {
                // No listening connection until someone subscribes.
                wanted.notified().await;
                db::forward_notifications(pool, CHANNEL, move || wake_tx.send_modify(|n| *n += 1))
                    .await;
            }
        };
        let subscriptions = Subscriptions {
            slots: Arc::new(Semaphore::new(config.max_subscribers)),
            config,
            pool,
            wake,
            wanted,
        };
        (Arc::new(subscriptions), forward)
    }

    fn page(&self) -> usize {
        PAGE.min(self.config.buffer).max(1)
    }
}

/// Where a subscription starts: strictly after a cursor, or after the
/// event at a global position (0: the start of the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    After(Checkpoint),
    AfterPosition(i64),
}

#[derive(Debug, PartialEq, Eq)]
struct Request {
    start: Start,
    filter: Filter,
}

/// The request's start and filter; `Last-Event-ID` (what an EventSource
/// sends when it reconnects) wins over `from`.
fn parse(headers: &HeaderMap, params: &BTreeMap<String, String>) -> ApiResult<Request> {
    super::dead_letters::only(params, &PARAMETERS)?;
    let start = match last_event_id(headers)? {
        Some(cursor) => Start::After(cursor.0),
        None => Start::AfterPosition(params.get("from").map_or(Ok(0), |f| position(f))?),
    };
    Ok(Request {
        start,
        filter: Filter {
            event_types: params.get("types").map(|t| event_types(t)).transpose()?,
            stream_prefix: params
                .get("streamPrefix")
                .map(|p| stream_prefix(p))
                .transpose()?,
        },
    })
}

fn last_event_id(headers: &HeaderMap) -> ApiResult<Option<Cursor>> {
    let invalid = |message: String| ApiError::bad_request("invalid_last_event_id", message);
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let id = value
        .to_str()
        .map_err(|_| invalid("Last-Event-ID: not a cursor (it is not ASCII text)".into()))?;
    // An empty ID is the SSE way of saying there is none.
    if id.is_empty() {
        return Ok(None);
    }
    let cursor = id.parse::<Cursor>();
    cursor
        .map(Some)
        .map_err(|e| invalid(format!("Last-Event-ID: {e}")))
}

fn position(from: &str) -> ApiResult<i64> {
    // Digits only: `parse` would take a sign.
    let digits = !from.is_empty() && from.bytes().all(|b| b.is_ascii_digit());
    let position = from.parse::<i64>().ok().filter(|_| digits);
    position.ok_or_else(|| {
        ApiError::bad_request(
            "invalid_from",
            format!("from: {from:?} is not a global position (an integer >= 0)"),
        )
    })
}

fn event_types(types: &str) -> ApiResult<Vec<String>> {
    let invalid = |message: String| ApiError::bad_request("invalid_types", message);
    let listed: Vec<String> = types.split(',').map(str::to_string).collect();
    if let Some(bad) = listed.iter().find(|t| !validate_event_type(t)) {
        return Err(invalid(format!(
            "types: {bad:?} is not an event type (1-128 letters, digits and _ . : -, \
             starting with a letter); separate types with commas"
        )));
    }
    if listed.len() > MAX_TYPES {
        return Err(invalid(format!("types: at most {MAX_TYPES} event types")));
    }
    Ok(listed)
}

fn stream_prefix(prefix: &str) -> ApiResult<String> {
    let fits = (1..=MAX_PREFIX_BYTES).contains(&prefix.len());
    if !fits || prefix.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_stream_prefix",
            format!("streamPrefix: must be 1-{MAX_PREFIX_BYTES} bytes without control characters"),
        ));
    }
    Ok(prefix.to_string())
}

/// Committed events in log order as Server-Sent Events.
///
/// From a cursor on, then as they commit. Each event's `id` is its cursor
/// `<tx_id>-<position>`, its `event` its type, its `data` the event as
/// JSON (`type`, `streamId`, `streamVersion`, `position`, `recordedAt`,
/// `data`, `metadata`). A comment `: heartbeat` goes out while idle; a
/// subscriber that stops reading gets `event: error` (`slow_consumer`)
/// if it reads again, and its connection is closed.
#[utoipa::path(
    get,
    path = "/v1/subscriptions/events",
    tag = "subscriptions",
    params(
        ("from" = Option<i64>, Query, description = "start after the event at this global position (0 or absent: from the start)"),
        ("types" = Option<String>, Query, description = "only these event types, separated by commas"),
        ("streamPrefix" = Option<String>, Query, description = "only streams whose id starts with this (literally)"),
        ("Last-Event-ID" = Option<String>, Header, description = "resume strictly after this event id (wins over `from`)"),
    ),
    responses(
        (status = 200, description = "an endless `text/event-stream`", content_type = "text/event-stream", body = String),
        (status = 400, description = "bad cursor, position, types, prefix or parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant every stream under the prefix", body = ErrorResponse),
        (status = 503, description = "too many subscribers, or the database is busy", body = ErrorResponse),
    )
)]
pub async fn subscribe(
    State(service): State<QueryService>,
    Extension(grants): Extension<Grants>,
    connection: Option<Extension<ConnectInfo<Connection>>>,
    headers: HeaderMap,
    params: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) = params?;
    let request = parse(&headers, &params)?;
    let prefix = request.filter.stream_prefix.as_deref().unwrap_or("");
    grants.require(Access::ReadStreamsUnder(prefix))?;
    let subscriptions = service.subscriptions.clone();
    let permit = subscriptions.slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::Unavailable {
            code: "too_many_subscribers",
            message: format!(
                "this process streams to {} subscribers already; try again shortly or another replica",
                subscriptions.config.max_subscribers
            ),
        }
    })?;
    let after = match request.start {
        Start::After(checkpoint) => checkpoint,
        Start::AfterPosition(0) => Checkpoint::default(),
        Start::AfterPosition(position) => {
            subscription::checkpoint_at(&subscriptions.pool, position)
                .await?
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_from",
                        format!("from: there is no event at position {position}"),
                    )
                })?
        }
    };
    subscriptions.wanted.notify_one();

    let (tx, rx) = mpsc::channel(subscriptions.config.buffer.max(1));
    let last_word = Arc::new(OnceLock::new());
    let producer = Producer {
        pool: subscriptions.pool.clone(),
        filter: request.filter,
        after,
        page: subscriptions.page(),
        stall_timeout: subscriptions.config.stall_timeout,
        wake: subscriptions.wake.clone(),
        last_word: last_word.clone(),
        connection: connection.map(|Extension(ConnectInfo(c))| c),
        slot: Slot::new(permit, service.metrics.clone()),
    };
    tokio::spawn(producer.run(tx));
    let outlet = Outlet {
        rx,
        last_word,
        metrics: service.metrics.clone(),
        done: false,
    };
    let keep_alive = KeepAlive::new()
        .interval(subscriptions.config.heartbeat)
        .text("heartbeat");
    let mut response = Sse::new(outlet.stream())
        .keep_alive(keep_alive)
        .into_response();
    // The connection ends with the subscription, so giving up on it (see
    // `Connection::drop_if_stalled`) concerns this request alone.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Ok(response)
}

/// A subscriber's place among the process's `max_subscribers`, counted in
/// the `subscribers` gauge while it is held.
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.subscribers.inc();
        Slot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.subscribers.dec();
    }
}

/// Reads one subscriber's events into its buffer; ends when the client is
/// gone or cut off, and its slot is freed then.
struct Producer {
    pool: PgPool,
    filter: Filter,
    /// Where the next read starts.
    after: Checkpoint,
    page: usize,
    stall_timeout: Duration,
    wake: watch::Receiver<u64>,
    /// The final frame, when the producer ends the subscription itself.
    last_word: Arc<OnceLock<Event>>,
    connection: Option<Connection>,
    slot: Slot,
}

impl Producer {
    /// Fills `tx`, the subscriber's buffer; dropping it when done ends the
    /// outlet.
    async fn run(mut self, tx: mpsc::Sender<Event>) {
        let mut behind_wait = MIN_BEHIND_WAIT;
        loop {
            let room = tokio::select! {
                room = tx.reserve_many(self.page) => Some(room),
                () = tokio::time::sleep(self.stall_timeout) => None,
            };
            let Some(room) = room else {
                return self.cut_off();
            };
            // The outlet is gone: the client left.
            let Ok(permits) = room else { return };
            // Notifications from here on wake the pause after this read.
            self.wake.borrow_and_update();
            let read = async {
                let mut conn = self.pool.acquire().await?;
                subscription::read(&mut conn, self.after, &self.filter, self.page as i64).await
            };
            let page = match read.await {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(error = %err, "subscription read failed; retrying");
                    drop(permits);
                    if !self.pause(&tx, RETRY, false).await {
                        return;
                    }
                    continue;
                }
            };
            for (permit, event) in permits.zip(&page.events) {
                permit.send(frame(event));
            }
            self.after = page.next;
            if page.full {
                continue;
            }
            // Everything below the horizon is read. Events at or above it
            // are held back by a transaction still running (no
            // notification comes when it ends) or just committed: look
            // again soon.
            let (wait, woken) = match events_beyond(&self.pool, page.horizon).await {
                Ok(true) => {
                    let wait = behind_wait;
                    behind_wait = (behind_wait * 2).min(MAX_BEHIND_WAIT);
                    (wait, false)
                }
                Ok(false) => {
                    behind_wait = MIN_BEHIND_WAIT;
                    (POLL_INTERVAL, true)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not check for events beyond the horizon");
                    (POLL_INTERVAL, true)
                }
            };
            if !self.pause(&tx, wait, woken).await {
                return;
            }
        }
    }

    /// Waits `duration`, or less when woken by a notification (if
    /// `woken`); false when the client left meanwhile.
    async fn pause(&mut self, tx: &mpsc::Sender<Event>, duration: Duration, woken: bool) -> bool {
        let notified = async {
            if !woken || self.wake.changed().await.is_err() {
                // No notifications (or none any more): the sleep decides.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = tokio::time::sleep(duration) => true,
            () = notified => true,
            () = tx.closed() => false,
        }
    }

    /// Ends a subscriber that stopped reading: its last word goes out ahead
    /// of what it has not taken, if it reads again; if it does not, its
    /// connection is dropped.
    fn cut_off(self) {
        let body = ErrorBody::new(
            "slow_consumer",
            format!(
                "the subscriber took no events for {} ms while its buffer was full; \
                 reconnect with Last-Event-ID set to the last id received to resume",
                self.stall_timeout.as_millis()
            ),
        )
        .to_json();
        let _ = self
            .last_word
            .set(Event::default().event("error").data(body.to_string()));
        self.slot.metrics.subscribers_cut_off.inc();
        tracing::info!(after = %Cursor(self.after), "subscriber cut off: it stopped reading");
        if let Some(connection) = &self.connection {
            connection.drop_if_stalled();
        }
        // The caller drops the sender next, which ends the outlet after
        // the last word; dropping the slot frees it.
    }
}

/// An event as one SSE frame.
fn frame(event: &TailEvent) -> Event {
    let frame = Event::default()
        .id(Cursor(event.checkpoint()).to_string())
        .data(event.envelope().to_string());
    // Appends validate types; one written around them with a line break
    // would break the frame, so it goes without a name.
    if validate_event_type(&event.event_type) {
        frame.event(&event.event_type)
    } else {
        frame
    }
}

/// The response body: the buffer's events, then the producer's last word
/// if it had one.
struct Outlet {
    rx: mpsc::Receiver<Event>,
    last_word: Arc<OnceLock<Event>>,
    metrics: Arc<Metrics>,
    done: bool,
}

impl Outlet {
    fn stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        futures::stream::unfold(self, |mut outlet| async move {
            if outlet.done {
                return None;
            }
            if let Some(last) = outlet.last_word.get() {
                outlet.done = true;
                return Some((Ok(last.clone()), outlet));
            }
            match outlet.rx.recv().await {
                Some(event) => {
                    outlet.metrics.subscription_events_sent.inc();
                    Some((Ok(event), outlet))
                }
                None => {
                    outlet.done = true;
                    let last = outlet.last_word.get().cloned()?;
                    Some((Ok(last), outlet))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn refusal(headers: &HeaderMap, pairs: &[(&str, &str)]) -> (String, String) {
        let err = parse(headers, &params(pairs)).unwrap_err();
        let body = err.body();
        (
            body["error"]["code"].as_str().unwrap().to_string(),
            body["error"]["message"].as_str().unwrap().to_string(),
        )
    }

    #[tokio::test]
    async fn the_last_word_goes_out_ahead_of_what_the_subscriber_has_not_taken() {
        use futures::StreamExt as _;
        let (tx, rx) = mpsc::channel(4);
        let last_word = Arc::new(OnceLock::new());
        let outlet = Outlet {
            rx,
            last_word: last_word.clone(),
            metrics: Metrics::new(),
            done: false,
        };
        let mut stream = Box::pin(outlet.stream());
        tx.send(Event::default().data("1")).await.unwrap();
        tx.send(Event::default().data("2")).await.unwrap();
        assert!(stream.next().await.is_some());
        last_word
            .set(Event::default().event("error").data("{}"))
            .unwrap();
        drop(tx);
        let rest: Vec<_> = stream.collect().await;
        assert_eq!(rest.len(), 1, "only the last word, then the end");
    }

    #[test]
    fn the_last_event_id_wins_over_from() {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_static("12-34"));
        let request = parse(&headers, &params(&[("from", "7")])).unwrap();
        assert_eq!(
            request.start,
            Start::After(Checkpoint {
                tx_id: 12,
                position: 34
            })
        );
        let request = parse(&HeaderMap::new(), &params(&[("from", "7")])).unwrap();
        assert_eq!(request.start, Start::AfterPosition(7));
        let request = parse(&HeaderMap::new(), &params(&[])).unwrap();
        assert_eq!(request.start, Start::AfterPosition(0));
        assert_eq!(request.filter, Filter::default());
    }

    #[test]
    fn filters_are_read_as_given() {
        let request = parse(
            &HeaderMap::new(),
            &params(&[("types", "OrderPlaced,OrderPaid"), ("streamPrefix", "a_%")]),
        )
        .unwrap();
        assert_eq!(
            request.filter,
            Filter {
                event_types: Some(vec!["OrderPlaced".into(), "OrderPaid".into()]),
                stream_prefix: Some("a_%".into()),
            }
        );
    }

    #[test]
    fn bad_parameters_are_refused_naming_them() {
        let none = HeaderMap::new();
        for (pairs, code, named) in [
            (&[("from", "x")][..], "invalid_from", "from"),
            (&[("from", "-1")][..], "invalid_from", "from"),
            (&[("from", "+1")][..], "invalid_from", "from"),
            (&[("types", "")][..], "invalid_types", "types"),
            (&[("types", "A,,B")][..], "invalid_types", "types"),
            (&[("types", "a b")][..], "invalid_types", "types"),
            (
                &[("streamPrefix", "")][..],
                "invalid_stream_prefix",
                "streamPrefix",
            ),
            (
                &[("streamPrefix", "a\nb")][..],
                "invalid_stream_prefix",
                "streamPrefix",
            ),
            (&[("limit", "5")][..], "unknown_parameter", "limit"),
        ] {
            let (got, message) = refusal(&none, pairs);
            assert_eq!(got, code, "{pairs:?}");
            assert!(message.contains(named), "{pairs:?}: {message}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_static("nope"));
        let (code, message) = refusal(&headers, &[]);
        assert_eq!(code, "invalid_last_event_id");
        assert!(message.contains("Last-Event-ID"), "{message}");
    }
}
