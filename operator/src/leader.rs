//! Leader election through a `coordination.k8s.io/v1` Lease, so that of
//! several operator replicas only one acts. The holder renews the Lease;
//! another replica takes it over once it has not been renewed for its
//! duration. Writes carry the Lease's resourceVersion, so two replicas can
//! never both win the same takeover.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub identity: String,
    /// A Lease not renewed for this long may be taken over.
    pub duration: Duration,
    /// How often the holder renews, and how often others try.
    pub renew_every: Duration,
}

fn micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros())
            .expect("timestamps of this era are in range"),
    )
}

fn to_chrono(t: &MicroTime) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.0.as_microsecond()).unwrap_or_default()
}

/// Whether `identity` may hold the Lease at `now`.
pub fn can_take(spec: Option<&LeaseSpec>, identity: &str, now: DateTime<Utc>) -> bool {
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = chrono::Duration::seconds(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    match &spec.renew_time {
        Some(renewed) => to_chrono(renewed) + duration < now,
        None => true,
    }
}

/// The Lease spec after `identity` took or renewed it at `now`.
pub fn held_by(
    previous: Option<&LeaseSpec>,
    config: &LeaseConfig,
    now: DateTime<Utc>,
) -> LeaseSpec {
    let same_holder =
        previous.and_then(|p| p.holder_identity.as_deref()) == Some(config.identity.as_str());
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.duration.as_secs() as i32),
        acquire_time: if same_holder {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(micro(now))
        },
        renew_time: Some(micro(now)),
        lease_transitions: Some(if same_holder || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

/// One attempt to take or renew the Lease. `Ok(false)`: someone else holds it.
pub async fn try_acquire(
    api: &Api<Lease>,
    config: &LeaseConfig,
    now: DateTime<Utc>,
) -> kube::Result<bool> {
    let current = api.get_opt(&config.name).await?;
    let previous = current.as_ref().and_then(|l| l.spec.as_ref());
    if !can_take(previous, &config.identity, now) {
        return Ok(false);
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            resource_version: current
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(held_by(previous, config, now)),
    };
    let result = match current {
        None => api.create(&PostParams::default(), &lease).await,
        Some(_) => {
            api.replace(&config.name, &PostParams::default(), &lease)
                .await
        }
    };
    match result {
        Ok(_) => Ok(true),
        // Another replica wrote first.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

/// Waits until this replica holds the Lease.
pub async fn acquire(api: &Api<Lease>, config: &LeaseConfig) -> kube::Result<()> {
    loop {
        match try_acquire(api, config, Utc::now()).await {
            Ok(true) => {
                tracing::info!(lease = %config.name, identity = %config.identity, "leadership acquired");
                return Ok(());
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "lease acquisition failed; retrying"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
}

/// Renews the Lease until it is lost; returns when another replica may
/// have taken over (the caller must stop acting).
pub async fn hold(api: &Api<Lease>, config: &LeaseConfig) {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(config.renew_every).await;
        match try_acquire(api, config, Utc::now()).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %config.name, "leadership lost to another replica");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "lease renewal failed");
                if last_renewed.elapsed() >= config.duration {
                    tracing::error!(lease = %config.name, "lease expired without renewal");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig {
            name: "eventplane-operator".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_fresh_lease_of_another_holder_is_respected() {
        let spec = held_by(None, &config("a"), t("2026-01-01T00:00:00Z"));
        assert!(!can_take(Some(&spec), "b", t("2026-01-01T00:00:10Z")));
        assert!(can_take(Some(&spec), "a", t("2026-01-01T00:00:10Z")));
    }

    #[test]
    fn an_expired_lease_can_be_taken_and_counts_a_transition() {
        let spec = held_by(None, &config("a"), t("2026-01-01T00:00:00Z"));
        let later = t("2026-01-01T00:00:16Z");
        assert!(can_take(Some(&spec), "b", later));
        let taken = held_by(Some(&spec), &config("b"), later);
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(1));
        let renewed = held_by(
            Some(&taken),
            &config("b"),
            later + chrono::Duration::seconds(5),
        );
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }

    #[test]
    fn no_lease_at_all_can_be_taken() {
        assert!(can_take(None, "a", t("2026-01-01T00:00:00Z")));
    }
}
