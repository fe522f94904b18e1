//! Catch-up subscriptions over SSE against real Postgres: every event once,
//! in log order, while writers append and a transaction commits late;
//! filters; resuming with `Last-Event-ID`; a subscriber that stops reading
//! cut off; the subscriber limit; refused parameters and tokens.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use eventplane::auth::AuthConfig;
use eventplane::server::{Roles, Stack, StackConfig};
use eventplane_store::checkpoints::Checkpoint;
use eventplane_store::subscription::{self, Filter};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest any one wait here may take before the test fails instead of
/// hanging; nothing asserts how long things take.
const PATIENCE: Duration = Duration::from_secs(60);

/// Commands and queries without the projector: subscriptions read the
/// log itself. Heartbeats come often, so a client that left is noticed soon.
fn config(db: &TestDb) -> StackConfig {
    let mut config = local(&db.url, None, orders());
    config.roles = Roles {
        command: true,
        projector: false,
        query: true,
    };
    config.query.subscriptions.heartbeat = Duration::from_millis(200);
    config
}

/// One SSE frame: an event, or a comment (a heartbeat).
#[derive(Clone, Debug, Default)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: String,
    comment: Option<String>,
}

impl Frame {
    fn envelope(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn position(&self) -> i64 {
        self.envelope()["position"].as_i64().unwrap()
    }
}

/// A subscription as a client reads it: the body parsed frame by frame.
struct Subscriber {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

fn subscribe_request(
    stack: &Stack,
    query: &str,
    last_event_id: Option<&str>,
) -> reqwest::RequestBuilder {
    let request = client().get(stack.url(&format!("/v1/subscriptions/events{query}")));
    match last_event_id {
        Some(id) => request.header("last-event-id", id),
        None => request,
    }
}

impl Subscriber {
    async fn open(stack: &Stack, query: &str, last_event_id: Option<&str>) -> Subscriber {
        let response = subscribe_request(stack, query, last_event_id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "subscribing with {query}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Subscriber {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next frame; `None` when the stream ended.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Some(parse_frame(std::str::from_utf8(&block).unwrap()));
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("a frame within the test's patience")
                .expect("the stream reads");
            self.buffer.extend_from_slice(&chunk?);
        }
    }

    /// The next event, heartbeats skipped.
    async fn event(&mut self) -> Frame {
        loop {
            let frame = self.frame().await.expect("the stream goes on");
            if frame.comment.is_none() {
                return frame;
            }
        }
    }

    async fn events(&mut self, n: usize) -> Vec<Frame> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            events.push(self.event().await);
        }
        events
    }
}

fn parse_frame(block: &str) -> Frame {
    let mut frame = Frame::default();
    for line in block.lines().filter(|l| !l.is_empty()) {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_string();
        match field {
            "" => frame.comment = Some(value),
            "id" => frame.id = Some(value),
            "event" => frame.event = Some(value),
            "data" => frame.data.push_str(&value),
            other => panic!("unknown SSE field {other:?} in {block:?}"),
        }
    }
    frame
}

fn ids(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(|f| f.id.clone().unwrap()).collect()
}

/// Every event's cursor, in log order.
async fn log(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT tx_id::text || '-' || position FROM events ORDER BY tx_id, position")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Appends `events` to `stream`; returns their positions.
async fn append_events(stack: &Stack, stream: &str, events: Vec<Value>) -> Vec<i64> {
    let (status, body) = append(&client(), stack, stream, json!("any"), events).await;
    assert_eq!(status, 201, "{body}");
    body["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap())
        .collect()
}

fn event(event_type: &str, n: usize) -> Value {
    json!({"type": event_type, "data": {"n": n}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_from_the_start_gets_every_event_once_in_log_order() {
    let db = TestDb::new().await;
    let stack = stack_with(config(&db)).await;
    let pool = db.pool().await;
    append_events(
        &stack,
        "before-1",
        (0..3).map(|n| event("Noted", n)).collect(),
    )
    .await;

    let mut subscriber = Subscriber::open(&stack, "?from=0", None).await;
    // Takes a transaction id before every writer below, and commits after
    // them: in log order its event comes first, and nothing after it may
    // go out while it is open.
    let mut late = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_type, data) \
         VALUES ('late-1', 1, 'Noted', '{\"late\": true}')",
    )
    .execute(&mut *late)
    .await
    .unwrap();

    const WRITERS: usize = 4;
    const APPENDS: usize = 20;
    const PER_APPEND: usize = 2;
    let total = 3 + 1 + WRITERS * APPENDS * PER_APPEND;
    let reader = tokio::spawn(async move {
        let got = subscriber.events(total).await;
        (got, subscriber)
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let url = stack.url("");
            tokio::spawn(async move {
                let http = client();
                for a in 0..APPENDS {
                    let events: Vec<Value> = (0..PER_APPEND)
                        .map(|n| event("Noted", a * 10 + n))
                        .collect();
                    let response = http
                        .post(format!("{url}/v1/streams/w{w}-s{}/events", a % 3))
                        .json(&json!({"expectedVersion": "any", "events": events}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 201);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    late.commit().await.unwrap();

    let (got, mut subscriber) = reader.await.unwrap();
    // Nothing more than those: the next event is one appended now.
    let sentinel = append_events(&stack, "after-1", vec![event("Sentinel", 0)]).await;
    let next = subscriber.event().await;
    assert_eq!(next.position(), sentinel[0], "{next:?}");

    let mut received = ids(&got);
    received.push(next.id.clone().unwrap());
    assert_eq!(received, log(&pool).await, "every event once, in log order");
    let late_at = got
        .iter()
        .position(|f| f.envelope()["streamId"] == "late-1")
        .expect("the late commit is delivered");
    assert!(
        got[late_at + 1..]
            .iter()
            .any(|f| f.envelope()["streamId"].as_str().unwrap().starts_with('w')),
        "writers' events that committed before it come after it"
    );
    let first = &got[0];
    assert_eq!(first.event.as_deref(), Some("Noted"));
    let envelope = first.envelope();
    assert_eq!(envelope["type"], "Noted");
    assert_eq!(envelope["streamId"], "before-1");
    assert_eq!(envelope["streamVersion"], 1);
    assert_eq!(envelope["data"], json!({"n": 0}));
    assert!(envelope["metadata"].is_object());
    assert!(envelope["recordedAt"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn types_and_a_literal_stream_prefix_select_exactly_the_matching_events() {
    let db = TestDb::new().await;
    let stack = stack_with(config(&db)).await;
    let pool = db.pool().await;
    let mut wanted = Vec::new();
    wanted.extend(
        append_events(
            &stack,
            "shop_a-1",
            vec![event("Placed", 0), event("Placed", 1)],
        )
        .await,
    );
    // `_` is a character here, not a wildcard.
    append_events(&stack, "shopXa-1", vec![event("Placed", 2)]).await;
    append_events(&stack, "shop_a-2", vec![event("Paid", 3)]).await;
    append_events(&stack, "other-1", vec![event("Shipped", 4)]).await;
    wanted.extend(append_events(&stack, "shop_a-3", vec![event("Shipped", 5)]).await);

    let mut subscriber =
        Subscriber::open(&stack, "?types=Placed,Shipped&streamPrefix=shop_a-", None).await;
    let got = subscriber.events(wanted.len()).await;
    let positions: Vec<i64> = got.iter().map(Frame::position).collect();
    assert_eq!(positions, wanted);
    // Written after events that do not match: the next one is this.
    append_events(&stack, "shopXa-2", vec![event("Placed", 6)]).await;
    append_events(&stack, "shop_a-2", vec![event("Paid", 7)]).await;
    let sentinel = append_events(&stack, "shop_a-9", vec![event("Placed", 8)]).await;
    assert_eq!(subscriber.event().await.position(), sentinel[0]);

    // `%` is a character too: no stream id holds one, so nothing matches,
    // though everything matches `shop`. Read once the whole log is below
    // the horizon (other tests' transactions hold it back for a while).
    let read = |prefix: &str| {
        let pool = pool.clone();
        let filter = Filter {
            event_types: None,
            stream_prefix: Some(prefix.to_string()),
        };
        async move {
            let mut conn = pool.acquire().await.unwrap();
            subscription::read(&mut conn, Checkpoint::default(), &filter, 100)
                .await
                .unwrap()
                .events
                .len()
        }
    };
    assert!(eventually(PATIENCE, || async { read("shop").await == 8 }).await);
    assert_eq!(read("shop%").await, 0);
    assert_eq!(read("shop_").await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_resumes_after_its_last_event_id_without_loss_or_repeat() {
    let db = TestDb::new().await;
    let stack = stack_with(config(&db)).await;
    let pool = db.pool().await;
    let mut positions = Vec::new();
    for a in 0..3 {
        positions.extend(
            append_events(
                &stack,
                "resume-1",
                (0..10).map(|n| event("Noted", a * 10 + n)).collect(),
            )
            .await,
        );
    }

    let mut first = Subscriber::open(&stack, "", None).await;
    let before = first.events(10).await;
    drop(first);
    append_events(
        &stack,
        "resume-2",
        (30..40).map(|n| event("Noted", n)).collect(),
    )
    .await;
    let last = before.last().unwrap().id.clone().unwrap();
    // The header wins over `from`.
    let mut again =
        Subscriber::open(&stack, &format!("?from={}", positions[24]), Some(&last)).await;
    let after = again.events(30).await;
    let mut received = ids(&before);
    received.extend(ids(&after));
    assert_eq!(received, log(&pool).await);

    // `from` is after the event at that position.
    let mut from = Subscriber::open(&stack, &format!("?from={}", positions[4]), None).await;
    assert_eq!(from.event().await.position(), positions[5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_that_stops_reading_is_cut_off_and_its_connection_dropped() {
    let db = TestDb::new().await;
    let mut config = config(&db);
    config.query.subscriptions.buffer = 8;
    config.query.subscriptions.stall_timeout = Duration::from_millis(300);
    config.query.subscriptions.max_subscribers = 1;
    let stack = stack_with(config).await;
    let pool = db.pool().await;
    // About 12 MB of events: more than the socket buffers on both sides
    // (4 MB at most each here), hyper's and the subscriber's buffer hold.
    const EVENTS: i64 = 3000;
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_type, data) \
         SELECT 'big-1', g, 'Big', jsonb_build_object('pad', repeat('x', 4000)) FROM generate_series(1, $1) g",
    )
    .bind(EVENTS)
    .execute(&pool)
    .await
    .unwrap();

    // A client with a small receive window that sends its request and
    // then reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(stack.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/subscriptions/events HTTP/1.1\r\nHost: eventplane\r\n\r\n")
        .await
        .unwrap();

    let metrics = stack.metrics.clone();
    let cut_off = eventually(PATIENCE, || {
        let metrics = metrics.clone();
        async move { metrics.subscribers_cut_off.get() == 1 && metrics.subscribers.get() == 0 }
    })
    .await;
    assert!(cut_off, "the subscriber is cut off and its slot freed");
    let exported = client()
        .get(stack.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        exported.contains("subscribers_cut_off_total 1"),
        "{exported}"
    );
    assert!(exported.contains("\nsubscribers 0"), "{exported}");

    // Reading now, the client finds what was sent before the cut-off,
    // then the end of the connection, not the whole log.
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .expect("the connection ends")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    let sent = text.matches("\nid: ").count() as i64;
    assert!(sent < EVENTS, "cut off before the end: {sent} events");
    // Dropped, not left to drain: the last word (`slow_consumer`) never
    // got past the full socket.
    assert!(
        !text.contains("slow_consumer"),
        "the connection was drained"
    );

    // Its place is free again.
    let mut next = Subscriber::open(&stack, "", None).await;
    assert_eq!(next.event().await.envelope()["streamVersion"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beyond_the_subscriber_limit_a_503_until_one_leaves() {
    let db = TestDb::new().await;
    let mut config = config(&db);
    config.query.subscriptions.max_subscribers = 2;
    let stack = stack_with(config).await;

    let first = Subscriber::open(&stack, "", None).await;
    let _second = Subscriber::open(&stack, "", None).await;
    let refused = subscribe_request(&stack, "", None).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_subscribers", "{body}");

    drop(first);
    let admitted = eventually(PATIENCE, || async {
        subscribe_request(&stack, "", None)
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    assert!(admitted, "a place frees when a subscriber leaves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_subscription_sends_heartbeats() {
    let db = TestDb::new().await;
    let stack = stack_with(config(&db)).await;
    let mut subscriber = Subscriber::open(&stack, "?types=Nothing", None).await;
    let frame = subscriber.frame().await.unwrap();
    assert_eq!(frame.comment.as_deref(), Some("heartbeat"), "{frame:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_parameters_are_refused_naming_them() {
    let db = TestDb::new().await;
    let stack = stack_with(config(&db)).await;
    for (query, last_event_id, code, named) in [
        ("?from=abc", None, "invalid_from", "from"),
        ("?from=-3", None, "invalid_from", "from"),
        ("?from=987654321", None, "invalid_from", "from"),
        ("?types=a%20b", None, "invalid_types", "types"),
        ("?types=", None, "invalid_types", "types"),
        (
            "?streamPrefix=",
            None,
            "invalid_stream_prefix",
            "streamPrefix",
        ),
        ("?limit=10", None, "unknown_parameter", "limit"),
        ("", Some("12"), "invalid_last_event_id", "Last-Event-ID"),
        (
            "?from=0",
            Some("x-1"),
            "invalid_last_event_id",
            "Last-Event-ID",
        ),
    ] {
        let response = subscribe_request(&stack, query, last_event_id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query} {last_event_id:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{query}: {message}");
    }
    assert_eq!(stack.metrics.subscribers.get(), 0);
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A token of the fixture JWKS's key granting `scope`.
fn token(scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": "https://issuer.example", "aud": "eventplane", "exp": now + 300, "scope": scope});
    let pem = std::fs::read(fixture("test-only-signing-key.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("test-1".into());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_must_grant_every_stream_under_the_prefix() {
    let db = TestDb::new().await;
    let mut config = config(&db);
    config.auth = Some(AuthConfig {
        jwks: fixture("jwks.json"),
        issuer: Some("https://issuer.example".into()),
        audience: Some("eventplane".into()),
        leeway: Duration::from_secs(30),
    });
    let stack = stack_with(config).await;
    let orders = token("read-stream:order-* read:*");
    for (query, bearer, status) in [
        ("?streamPrefix=order-", Some(&orders), 200),
        ("?streamPrefix=order-7", Some(&orders), 200),
        ("", Some(&orders), 403),
        ("?streamPrefix=invoice-", Some(&orders), 403),
        ("?streamPrefix=ord", Some(&orders), 403),
        ("?streamPrefix=order-", None, 401),
    ] {
        let mut request = subscribe_request(&stack, query, None);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{query} {}", bearer.is_some());
        if status != 200 {
            let body: Value = response.json().await.unwrap();
            assert!(body["error"]["code"].is_string(), "{body}");
        }
    }
}
