//! Read-your-writes: a read carrying a command's token waits, bounded, until
//! the projection's checkpoint has passed it, then reads from Postgres. The
//! checkpoint is read on the server the rows are read from: it commits with
//! them, so once a replica shows it passed, the replica has the rows too.
//!
//! A Kafka-fed projection has no such checkpoint (its partitions advance
//! independently), so a token on it is refused rather than waited on.

use std::time::{Duration, Instant};

use eventplane_store::checkpoints;

use super::QueryService;
use crate::api_error::{ApiError, ApiResult};
use eventplane_store::{Projection, Token};

/// Polling starts tight (the projector is usually a few milliseconds behind)
/// and backs off so a slow projection is not hammered.
const FIRST_WAIT: Duration = Duration::from_millis(1);
const MAX_WAIT: Duration = Duration::from_millis(25);

pub async fn wait_for(
    service: &QueryService,
    pool: &sqlx::PgPool,
    projection: &Projection,
    token: Token,
) -> ApiResult<()> {
    if projection.spec.kafka_topic().is_some() {
        return Err(ApiError::bad_request(
            "token_unsupported",
            format!(
                "projection {:?} is fed from Kafka, whose partitions advance independently: \
                 read-your-writes tokens work on projections fed from the Postgres log",
                projection.name
            ),
        ));
    }
    let projection = projection.name.as_str();
    let deadline = Instant::now() + service.consistency_timeout;
    let mut wait = FIRST_WAIT;
    loop {
        let passed = checkpoints::passed(pool, projection, token).await?;
        if passed == Some(true) {
            return Ok(());
        }
        if Instant::now() + wait > deadline {
            return Err(ApiError::Timeout {
                code: "consistency_timeout",
                message: format!(
                    "projection {projection:?} did not reach token {token} within {} ms",
                    service.consistency_timeout.as_millis()
                ),
            });
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_WAIT);
    }
}
