//! The admin listener: metrics and health, apart from the API so they need
//! no token and a probe never competes with client traffic.
//!
//! - `/healthz`: liveness; answers while the process runs. A database
//!   outage does not fail it: restarting would not bring the database back.
//! - `/readyz`: readiness; fails while the database does not answer, and
//!   (for the projector and query roles) until the catalog is loaded.
//! - `/metrics`: Prometheus text.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sqlx::PgPool;
use std::sync::Arc;

use crate::catalog::Follower;
use crate::metrics::{Metrics, metrics_handler};

/// Longest a readiness check waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Admin {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    /// Set for the roles that serve the catalog.
    pub follower: Option<Follower>,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready).with_state(admin.clone()))
        .route("/metrics", get(metrics_handler).with_state(admin.metrics))
}

async fn ready(State(admin): State<Admin>) -> Response {
    let ping = tokio::time::timeout(
        READY_TIMEOUT,
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&admin.pool),
    )
    .await;
    if !matches!(ping, Ok(Ok(1))) {
        return (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response();
    }
    if let Some(follower) = &admin.follower
        && follower.current().generation == 0
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "catalog not loaded").into_response();
    }
    "ready".into_response()
}
