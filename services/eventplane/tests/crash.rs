//! The command process killed with SIGKILL under load: every append it
//! acknowledged is stored with the version and position it answered, and a
//! client retrying with the same idempotency key (acknowledged or not)
//! writes each append once.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::sync::Mutex;

fn command_process(db: &TestDb, port: u16) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args(["command", "--admin-listen", "127.0.0.1:0", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "error")
        .spawn()
        .expect("the command process starts")
}

async fn up(http: &reqwest::Client, base: &str) -> bool {
    eventually(Duration::from_secs(20), || async {
        http.get(format!(
            "{base}/v1/jobs/00000000-0000-0000-0000-000000000000"
        ))
        .send()
        .await
        .is_ok()
    })
    .await
}

/// One append of stream `order-c<client>` at version `n`, with its key.
fn request(client: usize, n: i64) -> (String, String, Value) {
    let stream = format!("order-c{client}");
    let key = format!("append-{client}-{n}");
    let body =
        json!({"expectedVersion": n, "events": [placed(&format!("c{client}-{n}"), "c", "1")]});
    (stream, key, body)
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    stream: &str,
    key: &str,
    body: &Value,
) -> Option<(u16, Value)> {
    let response = http
        .post(format!("{base}/v1/streams/{stream}/events"))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_command_process_loses_no_acknowledged_append_and_retries_write_once() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    eventplane_store::db::migrate(&pool).await.unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = client();
    let mut process = command_process(&db, port);
    assert!(up(&http, &base).await, "the command process answers");

    // Each client appends to its own stream, one version after another,
    // until the process dies under it.
    let acknowledged: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let mut clients = Vec::new();
    for client in 0..16 {
        let (http, base, acknowledged) = (http.clone(), base.clone(), acknowledged.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (stream, key, body) = request(client, n);
                match send(&http, &base, &stream, &key, &body).await {
                    Some((201, answer)) => {
                        acknowledged.lock().await.insert(key, answer);
                        n += 1;
                    }
                    Some((status, answer)) => panic!("{key}: {status} {answer}"),
                    // The process is gone: this one is in doubt.
                    None => return (client, n),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    unsafe { libc::kill(process.id() as i32, libc::SIGKILL) };
    process.wait().unwrap();
    let mut in_doubt = Vec::new();
    for handle in clients {
        in_doubt.push(handle.await.unwrap());
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert!(
        acknowledged.len() > 50,
        "the load ran: {} appends",
        acknowledged.len()
    );

    // Every acknowledged append is stored as answered.
    for (key, answer) in &acknowledged {
        let stream = answer["streamId"].as_str().unwrap();
        let position = answer["positions"][0].as_i64().unwrap();
        let version = answer["version"].as_i64().unwrap();
        let stored: Option<(i64, i64)> = sqlx::query_as(
            "SELECT stream_version, position FROM events WHERE stream_id = $1 AND position = $2",
        )
        .bind(stream)
        .bind(position)
        .fetch_optional(&pool)
        .await
        .unwrap();
        assert_eq!(
            stored,
            Some((version, position)),
            "{key} is stored as acknowledged"
        );
    }

    // Back up; every client retries what it did not see answered, and a
    // few acknowledged ones, with the same keys.
    let mut process = command_process(&db, port);
    assert!(up(&http, &base).await);
    let events_before = count(&pool, "SELECT count(*) FROM events").await;
    for (key, answer) in acknowledged.iter().take(20) {
        let client: usize = key.split('-').nth(1).unwrap().parse().unwrap();
        let n: i64 = key.split('-').nth(2).unwrap().parse().unwrap();
        let (stream, key, body) = request(client, n);
        let (status, replayed) = send(&http, &base, &stream, &key, &body).await.unwrap();
        assert_eq!(
            (status, &replayed),
            (201, answer),
            "{key}: the first answer again"
        );
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM events").await,
        events_before,
        "replays of acknowledged appends write nothing"
    );
    for (client, n) in &in_doubt {
        let (stream, key, body) = request(*client, *n);
        let (status, answer) = send(&http, &base, &stream, &key, &body).await.unwrap();
        assert_eq!(
            status, 201,
            "{key}: committed before the kill or now: {answer}"
        );
        let again = send(&http, &base, &stream, &key, &body).await.unwrap();
        assert_eq!(again, (201, answer), "{key}: and only once");
    }
    // Each stream holds versions 1..=n exactly once.
    let gaps: i64 = count(
        &pool,
        "SELECT count(*) FROM (SELECT stream_id, count(*) AS n, count(DISTINCT stream_version) AS d, max(stream_version) AS top \
         FROM events GROUP BY stream_id) s WHERE n <> d OR n <> top",
    )
    .await;
    assert_eq!(gaps, 0, "no stream has a duplicate or a gap");
    let _ = process.kill();
    let _ = process.wait();
}
