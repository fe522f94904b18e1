//! A mocked Kubernetes API server (tower-test): each test states the exact
//! requests it expects, in order; the verifier asserts each one (method,
//! path, body) and answers it. A request that never comes makes the test
//! time out and fail; an unexpected one fails the assertion.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use eventplane_operator::context::Context;
use eventplane_operator::metrics::Metrics;

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub struct ApiServer {
    handle: Handle,
}

/// One request seen by the mock server.
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
    respond: tower_test::mock::SendResponse<Response<Body>>,
}

impl Seen {
    pub fn reply(self, status: StatusCode, body: Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.respond.send_response(response);
    }

    /// Echoes the request body back, as the API server does for a write.
    pub fn echo(self) {
        let body = self.body.clone();
        self.reply(StatusCode::OK, body);
    }

    pub fn not_found(self) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
        self.reply(StatusCode::NOT_FOUND, status);
    }
}

impl ApiServer {
    /// Waits for the next request (at most 10 s) and checks its method and path.
    pub async fn expect(&mut self, method: Method, path: &str) -> Seen {
        let next = tokio::time::timeout(Duration::from_secs(10), self.handle.next_request()).await;
        let (request, respond) = next
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .expect("client still alive");
        let seen_method = request.method().clone();
        let seen_path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        assert_eq!(
            (&seen_method, seen_path.as_str()),
            (&method, path),
            "unexpected request; body: {body}"
        );
        Seen {
            method: seen_method,
            path: seen_path,
            query,
            body,
            respond,
        }
    }

    /// Asserts that no further request arrives within `wait`.
    pub async fn expect_nothing(&mut self, wait: Duration) {
        if let Ok(Some((request, _))) = tokio::time::timeout(wait, self.handle.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

pub fn context() -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    (Context::new(client, Metrics::new()), ApiServer { handle })
}

#[allow(unused_imports)]
pub use eventplane_testkit::TestDb;
