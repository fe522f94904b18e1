//! The HTTP contract as a client sees it: every error is a JSON body with a
//! code, statuses follow the conventions (404, 405, 409, 414, 415, 431),
//! no Rust type name reaches a client, and `numeric` values come back
//! with every digit through every cache layer, lists and cursors.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body {text:?} is not JSON: {e}"));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_with_the_conventional_status() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let cases = [
        (http.get(stack.url("/nope")), 404, "route_not_found"),
        (
            http.get(stack.url("/v1/streams/a/b/c")),
            404,
            "route_not_found",
        ),
        (
            http.delete(stack.url("/v1/projections")),
            405,
            "method_not_allowed",
        ),
        (
            http.put(stack.url("/v1/streams/s-1/events")),
            405,
            "method_not_allowed",
        ),
        (
            http.get(stack.url(&format!("/v1/projections/orders/rows/{}", "k".repeat(9000)))),
            414,
            "uri_too_long",
        ),
        (
            http.get(stack.url("/v1/projections"))
                .header("x-padding", "p".repeat(40 * 1024)),
            431,
            "headers_too_large",
        ),
        (
            http.post(stack.url("/v1/streams/s-1/events"))
                .header("content-type", "application/xml")
                .body("<events/>"),
            415,
            "unsupported_media_type",
        ),
    ];
    for (request, status, code) in cases {
        let (seen, body) = error_of(request.send().await.unwrap()).await;
        assert_eq!(
            (seen, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_names_both_versions_as_numbers_and_no_rust_type_reaches_a_client() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let (status, _) = append(
        &http,
        &stack,
        "order-c1",
        json!("no_stream"),
        vec![placed("c1", "c", "1")],
    )
    .await;
    assert_eq!(status, 201);
    let (status, body) = append(
        &http,
        &stack,
        "order-c1",
        json!(0),
        vec![placed("c1", "c", "1")],
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "version_conflict");
    assert_eq!(body["error"]["expectedVersion"], json!(0));
    assert_eq!(body["error"]["actualVersion"], json!(1));
    let (status, body) = append(
        &http,
        &stack,
        "order-c1",
        json!("no_stream"),
        vec![placed("c1", "c", "1")],
    )
    .await;
    assert_eq!(
        (status, &body["error"]["expectedVersion"]),
        (409, &json!("no_stream"))
    );

    for expected in [json!("latest"), json!(1.5), json!([1]), json!({"v": 1})] {
        let (status, body) = append(
            &http,
            &stack,
            "order-c2",
            expected.clone(),
            vec![placed("c2", "c", "1")],
        )
        .await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, 422, "{expected}: {body}");
        assert!(
            message.contains("expectedVersion") || message.contains("\"any\""),
            "{message}"
        );
        for rust in ["untagged", "ExpectedVersion", "NamedVersion", "enum"] {
            assert!(!message.contains(rust), "{expected}: {message}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn numeric_values_come_back_with_every_digit() {
    let db = TestDb::new().await;
    let stack = stack(&db).await;
    let http = client();
    let exact = [
        "19.90",
        "12345678901234567890.123456789012",
        "0.000000000000000000001",
    ];
    for (i, total) in exact.iter().enumerate() {
        let (status, answer) = append(
            &http,
            &stack,
            &format!("order-n{i}"),
            json!("no_stream"),
            vec![placed(&format!("n{i}"), "exact", total)],
        )
        .await;
        assert_eq!(status, 201);
        let token = answer["token"].as_str().unwrap().to_string();
        let path = format!("/v1/projections/orders/rows/n{i}?token={token}");
        let raw = http
            .get(stack.url(&path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            raw.contains(&format!("\"total\": {total}"))
                || raw.contains(&format!("\"total\":{total}")),
            "{raw}"
        );
    }
    // Through the caches: the same text from L3, then L2/L1.
    for _ in 0..3 {
        let response = http
            .get(stack.url("/v1/projections/orders/rows/n1"))
            .send()
            .await
            .unwrap();
        let layer = response.headers()["eventplane-cache"]
            .to_str()
            .unwrap()
            .to_string();
        let raw = response.text().await.unwrap();
        assert!(
            raw.contains("12345678901234567890.123456789012"),
            "{layer}: {raw}"
        );
    }
    // Lists and the cursor of their next page.
    let first = http
        .get(stack.url("/v1/projections/orders/queries/by_customer?customer_id=exact&limit=1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let page: Value = serde_json::from_str(&first).unwrap();
    let mut seen = first.clone();
    let mut next = page["next"].as_str().map(str::to_string);
    let mut pages = 1;
    while let Some(cursor) = next {
        let text = http
            .get(stack.url(&format!(
                "/v1/projections/orders/queries/by_customer?customer_id=exact&limit=1&after={cursor}"
            )))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let page: Value = serde_json::from_str(&text).unwrap();
        next = page["next"].as_str().map(str::to_string);
        seen.push_str(&text);
        pages += 1;
        assert!(pages <= 3, "paging ends");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(pages, 3);
    for total in exact {
        assert!(seen.contains(total), "{total} in {seen}");
    }
}
