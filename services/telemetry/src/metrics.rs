//! A Prometheus registry that remembers the series names it exports, so
//! that dashboards and alert rules can be checked against what the code
//! really serves (a family with no series yet shows nothing at `/metrics`).

use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

pub struct Registrar {
    pub registry: Registry,
    prefix: Option<&'static str>,
    series: Vec<String>,
}

impl Registrar {
    pub fn new(prefix: Option<&'static str>) -> Self {
        let registry = match prefix {
            Some(prefix) => Registry::with_prefix(prefix),
            None => Registry::default(),
        };
        Registrar {
            registry,
            prefix,
            series: Vec::new(),
        }
    }

    pub fn register<M: Metric + TypedMetric>(&mut self, name: &str, help: &str, metric: M) {
        let full = match self.prefix {
            Some(prefix) => format!("{prefix}_{name}"),
            None => name.to_string(),
        };
        // The names OpenMetrics text gives each type's samples.
        match M::TYPE {
            MetricType::Counter => self.series.push(format!("{full}_total")),
            MetricType::Histogram => {
                for suffix in ["bucket", "sum", "count"] {
                    self.series.push(format!("{full}_{suffix}"));
                }
            }
            MetricType::Info => self.series.push(format!("{full}_info")),
            _ => self.series.push(full),
        }
        self.registry.register(name, help, metric);
    }

    /// Every series name registered, e.g. `commands_total`, `command_latency_bucket`.
    pub fn finish(self) -> (Registry, Vec<String>) {
        (self.registry, self.series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn the_recorded_names_are_the_samples_the_text_format_carries() {
        let mut registrar = Registrar::new(Some("ep"));
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        let latency = Histogram::new([0.1, 1.0]);
        let lag = Gauge::<i64>::default();
        registrar.register("requests", "Requests", requests.clone());
        registrar.register("latency_seconds", "Latency", latency.clone());
        registrar.register("lag", "Lag", lag.clone());
        let (registry, series) = registrar.finish();
        requests
            .get_or_create(&vec![("a".into(), "b".into())])
            .inc();
        latency.observe(0.5);
        lag.set(3);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .collect();
        for sample in &samples {
            assert!(
                series.iter().any(|s| s == sample),
                "{sample} not in {series:?}"
            );
        }
        assert_eq!(
            series,
            [
                "ep_requests_total",
                "ep_latency_seconds_bucket",
                "ep_latency_seconds_sum",
                "ep_latency_seconds_count",
                "ep_lag"
            ]
        );
    }
}
