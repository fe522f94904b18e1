//! Generated requests against a running stack, driven by its own OpenAPI
//! document: every operation with path parameters, query parameters,
//! headers and bodies drawn from hostile and ordinary values. The
//! properties: no answer is a 5xx, every error is a JSON body with a code,
//! and a rejected request writes nothing. The generator is seeded, so a
//! failure names the request that broke the property and repeats.

mod common;

use common::*;
use serde_json::{Value, json};

/// Requests per run; each property is checked on every one.
const REQUESTS: usize = 3000;

/// SplitMix64: small, seeded, good enough to spread choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn text(rng: &mut Rng) -> String {
    let fixed = [
        "orders",
        "order-1",
        "by_customer",
        "customer_id",
        "",
        "..",
        "%2e%2e%2f",
        "a b",
        "'; DROP TABLE events; --",
        "\u{0}",
        "ä😀",
        "0",
        "-1",
        "9223372036854775808",
        "1.5",
        "null",
        "true",
        "2024-05-01T00:00:00Z",
        "00000000-0000-0000-0000-000000000000",
        "any",
        "no_stream",
        "respond-async",
        "high",
        "0.0",
        "eyJ9",
    ];
    match rng.below(4) {
        0 => "x".repeat(1 + rng.below(600)),
        1 => (0..rng.below(20))
            .map(|_| char::from_u32(32 + rng.below(0x2ff) as u32).unwrap_or('?'))
            .collect(),
        _ => rng.pick(&fixed).to_string(),
    }
}

fn json_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(rng.next() as i64),
        3 => json!((rng.next() as f64) / 7.0),
        4 => json!(text(rng)),
        5 | 6 => Value::Array(
            (0..rng.below(4))
                .map(|_| json_value(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|_| (text(rng), json_value(rng, depth + 1)))
                .collect(),
        ),
    }
}

/// An append body: a valid one, one with a field gone wrong, or anything.
fn append_body(rng: &mut Rng) -> String {
    let mut body = json!({
        "expectedVersion": rng.pick(&[json!("any"), json!("no_stream"), json!(0), json!(1)]),
        "events": [{"type": "OrderPlaced", "data": {"orderId": text(rng), "customerId": "c", "total": "1.00"}}],
    });
    match rng.below(6) {
        0 => {}
        1 => body["expectedVersion"] = json_value(rng, 0),
        2 => body["events"] = json_value(rng, 0),
        3 => body["events"][0]["type"] = json_value(rng, 0),
        4 => body["events"][0]["data"] = json_value(rng, 0),
        _ => return json_value(rng, 0).to_string(),
    }
    if rng.chance(5) {
        // Cut short, as a dropped connection or a bad client would send it.
        let full = body.to_string();
        let mut cut = rng.below(full.len());
        while !full.is_char_boundary(cut) {
            cut -= 1;
        }
        return full[..cut].to_string();
    }
    body.to_string()
}

struct Operation {
    method: String,
    path: String,
    path_params: Vec<String>,
    query_params: Vec<String>,
}

fn operations(document: &Value) -> Vec<Operation> {
    let mut found = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let params = operation["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let named = |place: &str| {
                params
                    .iter()
                    .filter(|p| p["in"] == place)
                    .map(|p| p["name"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            };
            found.push(Operation {
                method: method.to_uppercase(),
                path: path.clone(),
                path_params: named("path"),
                query_params: named("query"),
            });
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_requests_never_get_a_5xx_a_bare_error_or_write_when_rejected() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let pool = db.pool().await;
    let document: Value = http
        .get(stack.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations = operations(&document);
    assert!(operations.len() >= 9, "the document describes the API");
    // Fixed, so a failure repeats; EVENTPLANE_FUZZ_SEED explores others.
    let seed = std::env::var("EVENTPLANE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001_u64);
    let mut rng = Rng(seed);
    let writes = || async {
        count(
            &pool,
            "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM command_jobs)",
        )
        .await
    };
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for n in 0..REQUESTS {
        let operation = rng.pick(&operations);
        let mut path = operation.path.clone();
        for name in &operation.path_params {
            let value = if rng.chance(40) && name == "name" {
                "orders".to_string()
            } else {
                text(&mut rng)
            };
            let encoded: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
            path = path.replace(&format!("{{{name}}}"), &encoded);
        }
        let mut url = url::Url::parse(&stack.url(&path))
            .unwrap_or_else(|_| url::Url::parse(&stack.url("/")).unwrap());
        {
            let mut query = url.query_pairs_mut();
            for name in &operation.query_params {
                if rng.chance(50) {
                    query.append_pair(name, &text(&mut rng));
                }
            }
            if rng.chance(20) {
                query.append_pair(&text(&mut rng), &text(&mut rng));
            }
        }
        let method = reqwest::Method::from_bytes(operation.method.as_bytes()).unwrap();
        let mut request = http.request(method.clone(), url.clone());
        for (header, value) in [
            ("idempotency-key", text(&mut rng)),
            ("prefer", text(&mut rng)),
            ("eventplane-priority", text(&mut rng)),
        ] {
            if rng.chance(25)
                && let Ok(value) = reqwest::header::HeaderValue::from_str(&value)
            {
                request = request.header(header, value);
            }
        }
        if method == reqwest::Method::POST {
            let content_type = if rng.chance(85) {
                "application/json"
            } else {
                "text/plain"
            };
            request = request
                .header("content-type", content_type)
                .body(append_body(&mut rng));
        }
        let before = writes().await;
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        // A subscription streams until its client leaves: the head is the
        // whole answer here.
        let streaming = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = if streaming {
            String::new()
        } else {
            response.text().await.unwrap()
        };
        let after = writes().await;
        *statuses.entry(status).or_default() += 1;
        let what = format!(
            "request {n} (seed {seed:#x}): {} {url} → {status} {body}",
            operation.method
        );
        assert!(status < 500, "a 5xx: {what}");
        if status >= 400 {
            let error: Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {what}"));
            assert!(error["error"]["code"].is_string(), "no error code: {what}");
            assert_eq!(before, after, "a rejected request wrote: {what}");
        }
    }
    eprintln!("statuses: {statuses:?}");
    assert!(
        statuses.keys().any(|s| *s < 300),
        "some requests succeeded: {statuses:?}"
    );
    assert!(
        statuses.keys().filter(|s| **s >= 400).count() >= 4,
        "many kinds of refusal: {statuses:?}"
    );
}
