//! Expensive reads are counted and logged with their plan, so an index a
//! declared query needs shows up in the logs, not only as latency.

use std::time::Duration;

use sqlx::AssertSqlSafe;
use tracing::Instrument as _;

use super::QueryService;
use crate::metrics::{QueryLabels, QueryType};

/// Counts and, in the background, logs the plan of a read that took at
/// least the configured threshold. `params` are the read's parameters as
/// text (every placeholder in generated SQL carries its own cast).
pub fn check(
    service: &QueryService,
    pool: &sqlx::PgPool,
    query_type: QueryType,
    sql: &str,
    params: Vec<String>,
    elapsed: Duration,
) {
    if elapsed < service.slow_query {
        return;
    }
    let labels = QueryLabels {
        query_type: query_type.as_str(),
    };
    service.metrics.slow_queries.get_or_create(&labels).inc();
    let pool = pool.clone();
    let sql = sql.to_string();
    // The plan is logged in the request's span: the line carries its trace.
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            let mut explain =
                sqlx::query_scalar::<_, String>(AssertSqlSafe(format!("EXPLAIN {sql}")));
            for param in &params {
                explain = explain.bind(param);
            }
            match explain.fetch_all(&pool).await {
                Ok(plan) => tracing::warn!(
                    query_type = %labels.query_type,
                    elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                    %sql,
                    plan = %plan.join("\n"),
                    "slow query"
                ),
                Err(err) => {
                    tracing::warn!(error = %err, %sql, "slow query; its plan could not be read")
                }
            }
        }
        .instrument(span),
    );
}
