//! The relay's lease keeper: renews (or takes) the lease in `relays` every
//! third of its time to live, and tells the publishing loop whether it may
//! publish. See `eventplane_store::relay` for why the lease is a row with an
//! expiry rather than an advisory lock.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::metrics::Metrics;

pub struct LeaseKeeper {
    pub pool: PgPool,
    pub relay: String,
    pub holder: String,
    pub ttl: Duration,
    pub metrics: Arc<Metrics>,
}

impl LeaseKeeper {
    /// Renews until `stop` turns true, publishing `true` on `held` while
    /// the lease is this process's. A failed renewal counts as lost: the
    /// lease may expire before the next one succeeds, and another replica
    /// may then take it.
    pub async fn run(self, held: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        // A third of the TTL: two renewals may fail before the lease lapses.
        let every = self.ttl / 3;
        loop {
            let now_held = match eventplane_store::relay::hold(
                &self.pool,
                &self.relay,
                &self.holder,
                self.ttl,
            )
            .await
            {
                Ok(held) => held,
                Err(err) => {
                    tracing::warn!(relay = %self.relay, error = %err, "could not renew the relay lease");
                    false
                }
            };
            if now_held != *held.borrow() {
                tracing::info!(relay = %self.relay, holder = %self.holder, held = now_held, "relay lease changed");
            }
            self.metrics.relay_lease_held.set(i64::from(now_held));
            held.send_replace(now_held);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => break,
            }
        }
        held.send_replace(false);
        self.metrics.relay_lease_held.set(0);
        if let Err(err) =
            eventplane_store::relay::release(&self.pool, &self.relay, &self.holder).await
        {
            tracing::warn!(relay = %self.relay, error = %err, "could not release the relay lease");
        }
    }
}
