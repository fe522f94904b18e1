//! Wakes the projectors after appends commit. Notifying from inside the
//! append transaction would hold a database-wide lock through each commit's
//! WAL flush and serialise all appends; instead committers raise a signal
//! and one task sends `NOTIFY eventplane_events` outside any write
//! transaction. Signals raised while a notification is on its way fold
//! into the next one.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub const CHANNEL: &str = "eventplane_events";

#[derive(Clone)]
pub struct CommitSignal {
    wake: Arc<Notify>,
}

impl CommitSignal {
    pub fn start(pool: PgPool) -> (CommitSignal, JoinHandle<()>) {
        let wake = Arc::new(Notify::new());
        let task = {
            let wake = wake.clone();
            tokio::spawn(async move {
                loop {
                    wake.notified().await;
                    if let Err(err) = sqlx::query("SELECT pg_notify($1, '')")
                        .bind(CHANNEL)
                        .execute(&pool)
                        .await
                    {
                        // The projectors' periodic poll picks the events up.
                        tracing::warn!(error = %err, "could not notify the projectors");
                    }
                }
            })
        };
        (CommitSignal { wake }, task)
    }

    /// Events were committed.
    pub fn committed(&self) {
        self.wake.notify_one();
    }
}
