//! Operator metrics at `/metrics` (prefix `eventplane_operator_`):
//! reconciles and failures by controller, when each controller last
//! reconciled successfully, whether this replica leads, and per resource
//! what the alerts watch (a failed rebuild, how far partitions are premade).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use eventplane_telemetry::metrics::Registrar;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

/// One Projection or PartitionPolicy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub namespace: String,
    pub name: String,
}

impl ResourceLabels {
    pub fn new(namespace: &str, name: &str) -> Self {
        ResourceLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The `controller` label values.
pub const PROJECTION: &str = "projection";
pub const PARTITION_POLICY: &str = "partitionpolicy";

pub struct Metrics {
    registry: Registry,
    /// Every series name this registry exports.
    pub series: Vec<String>,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub failures: Family<ControllerLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
    /// Unix time of the controller's last reconcile that wrote a status.
    pub last_success: Family<ControllerLabels, FloatGauge>,
    /// 1 while this replica holds the Lease (or runs without election).
    pub leader: Gauge,
    /// 1 while a Projection's last rebuild Job failed (phase Failed).
    pub rebuild_failed: Family<ResourceLabels, Gauge>,
    /// Unix time up to which a PartitionPolicy's table has partitions.
    pub premade_until: Family<ResourceLabels, FloatGauge>,
    /// Resources each controller watches, so that an alert on a stale
    /// last success can tell "nothing to reconcile" from "not reconciling".
    pub resources: Family<ControllerLabels, Gauge>,
    /// The resources each controller's per-resource series were set for,
    /// so those of deleted resources can be dropped.
    tracked: Mutex<HashMap<&'static str, HashSet<ResourceLabels>>>,
}

fn buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registrar::new(Some("eventplane_operator"));
        let m = Metrics {
            registry: Registry::default(),
            series: Vec::new(),
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(buckets as fn() -> Histogram),
            last_success: Family::default(),
            leader: Gauge::default(),
            rebuild_failed: Family::default(),
            premade_until: Family::default(),
            resources: Family::default(),
            tracked: Mutex::default(),
        };
        registry.register("reconciles", "Reconciles run", m.reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that returned an error",
            m.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            m.duration.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the controller's last successful reconcile",
            m.last_success.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the one acting",
            m.leader.clone(),
        );
        registry.register(
            "projection_rebuild_failed",
            "1 while the Projection's last rebuild Job failed",
            m.rebuild_failed.clone(),
        );
        registry.register(
            "partitions_premade_until_timestamp_seconds",
            "Unix time up to which the PartitionPolicy's table has partitions",
            m.premade_until.clone(),
        );
        registry.register(
            "resources",
            "Resources the controller watches",
            m.resources.clone(),
        );
        let (registry, series) = registry.finish();
        Arc::new(Metrics {
            registry,
            series,
            ..m
        })
    }

    /// Records a successful reconcile of `controller` at `now`.
    pub fn succeeded(&self, controller: &ControllerLabels, now: DateTime<Utc>) {
        self.last_success
            .get_or_create(controller)
            .set(now.timestamp_millis() as f64 / 1000.0);
    }

    /// Sets whether a Projection's last rebuild failed.
    pub fn set_rebuild_failed(&self, labels: ResourceLabels, failed: bool) {
        self.rebuild_failed
            .get_or_create(&labels)
            .set(i64::from(failed));
        self.track(PROJECTION, labels);
    }

    /// Sets (or, without a value, clears) how far a PartitionPolicy's
    /// partitions are premade.
    pub fn set_premade_until(&self, labels: ResourceLabels, until: Option<DateTime<Utc>>) {
        match until {
            Some(until) => {
                self.premade_until
                    .get_or_create(&labels)
                    .set(until.timestamp() as f64);
                self.track(PARTITION_POLICY, labels);
            }
            None => {
                self.premade_until.remove(&labels);
            }
        }
    }

    fn track(&self, controller: &'static str, labels: ResourceLabels) {
        let mut tracked = self.tracked.lock().expect("not poisoned");
        tracked.entry(controller).or_default().insert(labels);
    }

    /// Records the resources `controller` watches now: their count, and
    /// drops the per-resource series of any that are gone (a deleted
    /// PartitionPolicy has no cleanup step that could).
    pub fn observe_live(&self, controller: &'static str, live: &HashSet<ResourceLabels>) {
        self.resources
            .get_or_create(&ControllerLabels { controller })
            .set(live.len() as i64);
        let mut tracked = self.tracked.lock().expect("not poisoned");
        let Some(seen) = tracked.get_mut(controller) else {
            return;
        };
        for gone in seen.difference(live).cloned().collect::<Vec<_>>() {
            match controller {
                PROJECTION => self.rebuild_failed.remove(&gone),
                _ => self.premade_until.remove(&gone),
            };
            seen.remove(&gone);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// How often [`follow_store`] looks at a controller's cache.
const LIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Reports, for as long as it runs, what `controller`'s cache of watched
/// resources holds: see [`Metrics::observe_live`].
pub async fn follow_store<K>(
    store: kube::runtime::reflector::Store<K>,
    metrics: Arc<Metrics>,
    controller: &'static str,
) where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut tick = tokio::time::interval(LIVE_EVERY);
    loop {
        tick.tick().await;
        let live: HashSet<ResourceLabels> = store
            .state()
            .iter()
            .filter_map(|r| {
                let meta = r.meta();
                Some(ResourceLabels::new(
                    meta.namespace.as_deref()?,
                    meta.name.as_deref()?,
                ))
            })
            .collect();
        metrics.observe_live(controller, &live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_under_the_operator_prefix() {
        let m = Metrics::new();
        let labels = ControllerLabels {
            controller: "projection",
        };
        m.reconciles.get_or_create(&labels).inc();
        m.succeeded(&labels, DateTime::from_timestamp(1_700_000_000, 0).unwrap());
        m.leader.set(1);
        m.rebuild_failed
            .get_or_create(&ResourceLabels::new("shop", "orders"))
            .set(1);
        m.premade_until
            .get_or_create(&ResourceLabels::new("shop", "events"))
            .set(1.8e9);
        m.resources
            .get_or_create(&ControllerLabels {
                controller: PROJECTION,
            })
            .set(2);
        let text = m.encode();
        for line in [
            "eventplane_operator_resources{controller=\"projection\"} 2",
            "eventplane_operator_reconciles_total{controller=\"projection\"} 1",
            "eventplane_operator_last_success_timestamp_seconds{controller=\"projection\"} 1700000000.0",
            "eventplane_operator_leader 1",
            "eventplane_operator_projection_rebuild_failed{namespace=\"shop\",name=\"orders\"} 1",
            "eventplane_operator_partitions_premade_until_timestamp_seconds{namespace=\"shop\",name=\"events\"} 1800000000.0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn series_of_deleted_resources_are_dropped() {
        let m = Metrics::new();
        let (orders, invoices) = (
            ResourceLabels::new("shop", "orders"),
            ResourceLabels::new("shop", "invoices"),
        );
        m.set_rebuild_failed(orders.clone(), true);
        m.set_rebuild_failed(invoices.clone(), false);
        let until = DateTime::from_timestamp(1_800_000_000, 0);
        m.set_premade_until(orders.clone(), until);
        m.observe_live(PROJECTION, &HashSet::from([invoices.clone()]));
        let text = m.encode();
        assert!(
            !text.contains("projection_rebuild_failed{namespace=\"shop\",name=\"orders\"}"),
            "{text}"
        );
        assert!(text.contains("projection_rebuild_failed{namespace=\"shop\",name=\"invoices\"} 0"));
        assert!(text.contains("eventplane_operator_resources{controller=\"projection\"} 1"));
        // A PartitionPolicy of the same name is another controller's.
        assert!(text.contains(
            "partitions_premade_until_timestamp_seconds{namespace=\"shop\",name=\"orders\"}"
        ));
        m.observe_live(PARTITION_POLICY, &HashSet::new());
        let text = m.encode();
        assert!(
            !text.contains("partitions_premade_until_timestamp_seconds{"),
            "{text}"
        );
        assert!(text.contains("eventplane_operator_resources{controller=\"partitionpolicy\"} 0"));
    }
}
