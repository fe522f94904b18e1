//! The references for reads: a bare axum server on the row route, with no
//! cache, auth, metrics or middleware. One answers every request with the
//! same pre-encoded row (what a cache hit can at best cost over HTTP); the
//! other runs the primary-key `SELECT` the query service's L3 runs (what a
//! miss can at best cost).

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;

/// A running reference server; stops when dropped.
pub struct Bare {
    pub base: String,
    task: JoinHandle<()>,
}

impl Drop for Bare {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(app: Router) -> anyhow::Result<Bare> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Bare { base, task })
}

/// Every `GET /v1/projections/{name}/rows/{key}` answers `row`.
pub async fn fixed(row: Bytes) -> anyhow::Result<Bare> {
    let app = Router::new()
        .route(
            "/v1/projections/{name}/rows/{key}",
            get(|State(row): State<Bytes>| async move {
                ([(header::CONTENT_TYPE, "application/json")], row)
            }),
        )
        .with_state(row);
    serve(app).await
}

#[derive(Clone)]
struct Select {
    pool: PgPool,
    sql: String,
}

/// `GET /v1/projections/{name}/rows/{key}` reads the row from `table` by
/// `key_column`, rendered by Postgres as the query service renders it.
pub async fn select(pool: PgPool, table: &str, key_column: &str) -> anyhow::Result<Bare> {
    let sql = format!(
        "SELECT to_jsonb(t)::text FROM {} t WHERE {} = $1",
        eventplane_api::quote_ident(table),
        eventplane_api::quote_ident(key_column)
    );
    let app = Router::new()
        .route(
            "/v1/projections/{name}/rows/{key}",
            get(
                |State(s): State<Select>, Path((_, key)): Path<(String, String)>| async move {
                    let row: Result<Option<String>, _> =
                        sqlx::query_scalar(AssertSqlSafe(s.sql.clone()))
                            .bind(key)
                            .fetch_optional(&s.pool)
                            .await;
                    match row {
                        Ok(Some(row)) => {
                            ([(header::CONTENT_TYPE, "application/json")], row).into_response()
                        }
                        Ok(None) => StatusCode::NOT_FOUND.into_response(),
                        Err(err) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()
                        }
                    }
                },
            ),
        )
        .with_state(Select { pool, sql });
    serve(app).await.context("starting the bare SELECT server")
}
