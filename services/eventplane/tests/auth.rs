//! Authenticated access: bearer JWTs checked against a JWKS (signature,
//! issuer, audience, expiry with leeway), scopes that grant appends by
//! stream prefix and reads by projection, JSON 401/403, and metrics and
//! health apart, without a token.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use eventplane::auth::AuthConfig;
use eventplane::server::Stack;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "eventplane";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token signed with the test key `test-1` of the fixture JWKS.
fn token(claims: Value, kid: &str) -> String {
    let pem = std::fs::read(fixture("test-only-signing-key.pem")).unwrap();
    let key = EncodingKey::from_ed_pem(&pem).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn claims(scope: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "client-1", "exp": now() + 300, "scope": scope})
}

async fn secured(db: &TestDb) -> Stack {
    let invoices = {
        let yaml = eventplane::dev::ORDERS_MANIFEST
            .replace("name: orders", "name: invoices")
            .replace("table: orders", "table: invoices");
        eventplane_api::load_manifests(&yaml).unwrap().remove(0)
    };
    let mut declared = orders();
    declared.push(invoices);
    let mut config = local(&db.url, Some(&redis_url()), declared);
    config.auth = Some(AuthConfig {
        jwks: fixture("jwks.json"),
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        leeway: Duration::from_secs(30),
    });
    stack_with(config).await
}

async fn call(request: reqwest::RequestBuilder) -> (u16, Value, Option<String>) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        challenge,
    )
}

fn append_body(order: &str) -> Value {
    json!({"expectedVersion": "any", "events": [placed(order, "c", "1")]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_for_order_streams_cannot_append_elsewhere_or_read_another_projection() {
    let db = TestDb::new().await;
    let stack = secured(&db).await;
    let http = client();
    let bearer = token(claims("append:order-* read:orders"), "test-1");
    let with = |r: reqwest::RequestBuilder| r.bearer_auth(&bearer);

    let (status, body, _) =
        call(with(http.post(stack.url("/v1/streams/order-1/events"))).json(&append_body("1")))
            .await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let (status, body, _) =
        call(with(http.post(stack.url("/v1/streams/invoice-1/events"))).json(&append_body("i1")))
            .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invoice-1")
    );

    let (status, row, _) = call(with(
        http.get(stack.url(&format!("/v1/projections/orders/rows/1?token={token}"))),
    ))
    .await;
    assert_eq!((status, row["id"].as_str()), (200, Some("1")), "{row}");
    for path in [
        "/v1/projections/invoices/rows/1",
        "/v1/projections/invoices/status",
        "/v1/projections/invoices/queries/recent",
        "/v1/streams/order-1",
    ] {
        let (status, body, _) = call(with(http.get(stack.url(path)))).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{path}: {body}"
        );
    }
    let (_, listed, _) = call(with(http.get(stack.url("/v1/projections")))).await;
    assert_eq!(
        listed["projections"],
        json!(["orders"]),
        "only what the token may read"
    );

    let pool = db.pool().await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE stream_id = 'invoice-1'"
        )
        .await,
        0,
        "a refused append writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_a_json_401_and_metrics_need_none() {
    let db = TestDb::new().await;
    let stack = secured(&db).await;
    let http = client();
    let url = stack.url("/v1/projections/orders/status");
    let mut expired = claims("read:*");
    expired["exp"] = json!(now() - 120);
    let mut wrong_issuer = claims("read:*");
    wrong_issuer["iss"] = json!("https://elsewhere.example");
    let mut wrong_audience = claims("read:*");
    wrong_audience["aud"] = json!("someone-else");
    let symmetric = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("read:*"),
        &EncodingKey::from_secret(b"guessable"),
    )
    .unwrap();
    let cases = [
        ("no token", None),
        ("garbage", Some("not-a-jwt".to_string())),
        ("expired", Some(token(expired, "test-1"))),
        ("wrong issuer", Some(token(wrong_issuer, "test-1"))),
        ("wrong audience", Some(token(wrong_audience, "test-1"))),
        (
            "signed by another key",
            Some(token(claims("read:*"), "test-2")),
        ),
        ("unknown key", Some(token(claims("read:*"), "test-9"))),
        ("symmetric", Some(symmetric)),
    ];
    for (what, bearer) in cases {
        let mut request = http.get(&url);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let (status, body, challenge) = call(request).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
        assert_eq!(challenge.as_deref(), Some("Bearer"), "{what}");
    }
    // Within the leeway a just-expired token still counts.
    let mut just_expired = claims("read:*");
    just_expired["exp"] = json!(now() - 5);
    let (status, body, _) = call(http.get(&url).bearer_auth(token(just_expired, "test-1"))).await;
    assert_eq!(status, 200, "{body}");
    // Scopes may come as a list too.
    let listed = json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() + 60, "scp": ["read:orders"]});
    let (status, _, _) = call(http.get(&url).bearer_auth(token(listed, "test-1"))).await;
    assert_eq!(status, 200);

    for path in ["/metrics", "/healthz", "/readyz"] {
        let response = http.get(stack.admin_url(path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path} needs no token");
    }
    let (status, body, _) = call(http.get(stack.url("/metrics"))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("route_not_found")),
        "the API listener serves no metrics"
    );
}
