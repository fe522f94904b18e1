//! Operator metrics at `/metrics` (prefix `eventplane_operator_`):
//! reconciles and failures by controller, when each controller last
//! reconciled successfully, whether this replica leads, and per resource
//! what the alerts watch (a failed rebuild, how far partitions are premade).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

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

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
        let text = m.encode();
        for line in [
            "eventplane_operator_reconciles_total{controller=\"projection\"} 1",
            "eventplane_operator_last_success_timestamp_seconds{controller=\"projection\"} 1700000000.0",
            "eventplane_operator_leader 1",
            "eventplane_operator_projection_rebuild_failed{namespace=\"shop\",name=\"orders\"} 1",
            "eventplane_operator_partitions_premade_until_timestamp_seconds{namespace=\"shop\",name=\"events\"} 1800000000.0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
