//! The scrape of a Projection's query pods: which pods are worth asking,
//! the HTTP fetch of their `/metrics`, and the `query_latency` histogram
//! read out of the Prometheus or OpenMetrics text they serve.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use prometheus_parse::Value;
use serde::{Deserialize, Serialize};

use super::Signals;
use super::signals::signals_between;

/// Port of the query pods' admin listener (`--admin-listen`), where they
/// serve Prometheus metrics without a token.
const METRICS_PORT: u16 = 9090;

/// A scrape slower than this is skipped: a pod that cannot answer in time
/// is no signal, and the reconcile must not wait on it.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The query-latency counters of one pod at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodSample {
    /// Queries served since the pod started, every query type together.
    pub count: f64,
    /// `(upper bound in seconds, cumulative count)`, ascending, ending with
    /// the `+Inf` bucket; every query type together.
    pub buckets: Vec<(f64, f64)>,
}

/// Every measured query pod at one moment, keyed by pod UID (a pod
/// recreated under the same name is another pod).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scrape {
    pub at: DateTime<Utc>,
    pub pods: BTreeMap<String, PodSample>,
}

/// Reads the `query_latency` histogram out of a pod's metrics text.
/// Lines the parser does not understand are ignored, and so are NaN
/// values: a NaN count says nothing about how many queries were served.
pub fn parse_metrics(text: &str) -> PodSample {
    let lines = text.lines().map(|line| Ok(line.to_string()));
    let Ok(parsed) = prometheus_parse::Scrape::parse(lines) else {
        return PodSample::default();
    };
    let mut sample = PodSample::default();
    let known = |v: &f64| !v.is_nan();
    for metric in parsed.samples {
        match (metric.metric.as_str(), &metric.value) {
            (
                "query_latency_count",
                Value::Counter(count) | Value::Gauge(count) | Value::Untyped(count),
            ) if known(count) => sample.count += count,
            ("query_latency", Value::Histogram(buckets)) => sample.buckets.extend(
                buckets
                    .iter()
                    .map(|b| (b.less_than, b.count))
                    .filter(|(le, count)| known(le) && known(count)),
            ),
            // Without a `# TYPE query_latency histogram` line the parser
            // cannot know the buckets for what they are.
            ("query_latency_bucket", Value::Untyped(count)) if known(count) => {
                let le = metric.labels.get("le").and_then(|le| le.parse().ok());
                if let Some(le) = le.filter(known) {
                    sample.buckets.push((le, *count));
                }
            }
            _ => {}
        }
    }
    sample.buckets = merge_buckets(sample.buckets);
    sample
}

/// Sorts buckets by bound and adds up those with the same bound (one per
/// query type, or one per pod).
pub(super) fn merge_buckets(mut buckets: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(buckets.len());
    for (le, count) in buckets {
        match merged.last_mut() {
            Some(last) if last.0 == le => last.1 += count,
            _ => merged.push((le, count)),
        }
    }
    merged
}

/// The label selector of a Deployment's pods, from its `matchLabels`;
/// empty when it has none.
pub fn pod_selector(deployment: &Deployment) -> String {
    deployment
        .spec
        .selector
        .match_labels
        .as_ref()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// Key and metrics URL of a pod worth scraping: running, ready, not being
/// deleted, with an IP.
pub fn scrape_target(pod: &Pod) -> Option<(String, String)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let key = pod
        .metadata
        .uid
        .clone()
        .or_else(|| pod.metadata.name.clone())?;
    Some((key, format!("http://{host}:{METRICS_PORT}/metrics")))
}

fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(SCRAPE_TIMEOUT)
            .build()
            .unwrap_or_default()
    })
}

async fn fetch(url: &str) -> Option<PodSample> {
    let response = http().get(url).send().await.ok()?.error_for_status().ok()?;
    Some(parse_metrics(&response.text().await.ok()?))
}

/// Scrapes the query pods matching `selector` and derives the signals from
/// the interval since `previous`. Returns the signals and this scrape, to be
/// passed as `previous` next time. Never fails: a pod that cannot be listed
/// or scraped is left out, and with nothing measured the signals are empty.
/// Lag and rebuilding are not measured here (the query pods do not know
/// them); the caller fills them in.
pub async fn observe(
    client: &Client,
    namespace: &str,
    selector: &str,
    previous: Option<&Scrape>,
) -> (Signals, Scrape) {
    let at = Utc::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let targets: Vec<(String, String)> =
        match pods.list(&ListParams::default().labels(selector)).await {
            Ok(list) => list.items.iter().filter_map(scrape_target).collect(),
            Err(err) => {
                tracing::warn!(namespace, selector, error = %err, "listing query pods failed");
                Vec::new()
            }
        };
    let samples = futures::future::join_all(targets.into_iter().map(|(key, url)| async move {
        let sample = fetch(&url).await;
        if sample.is_none() {
            tracing::debug!(%url, "query pod not scraped");
        }
        sample.map(|s| (key, s))
    }))
    .await;
    let scrape = Scrape {
        at,
        pods: samples.into_iter().flatten().collect(),
    };
    (signals_between(previous, &scrape), scrape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const POD_TEXT: &str = r#"# HELP query_latency Query latency in seconds.
# TYPE query_latency histogram
query_latency_sum{query_type="row"} 0.9
query_latency_count{query_type="row"} 100
query_latency_bucket{le="0.001",query_type="row"} 10
query_latency_bucket{le="0.01",query_type="row"} 90
query_latency_bucket{le="0.1",query_type="row"} 100
query_latency_bucket{le="+Inf",query_type="row"} 100
query_latency_sum{query_type="list"} 2.0
query_latency_count{query_type="list"} 20
query_latency_bucket{query_type="list",le="0.001"} 0
query_latency_bucket{query_type="list",le="0.01"} 5
query_latency_bucket{query_type="list",le="0.1"} 19
query_latency_bucket{query_type="list",le="+Inf"} 20 # {trace_id="a}b"} 0.2 1.7e9
# TYPE command_latency histogram
command_latency_count{command_type="place"} 7
command_latency_bucket{le="+Inf",command_type="place"} 7
# EOF
"#;

    #[test]
    fn parse_metrics_sums_query_types_and_ignores_other_metrics() {
        let sample = parse_metrics(POD_TEXT);
        assert_eq!(sample.count, 120.0);
        assert_eq!(
            sample.buckets,
            vec![
                (0.001, 10.0),
                (0.01, 95.0),
                (0.1, 119.0),
                (f64::INFINITY, 120.0)
            ]
        );
    }

    #[test]
    fn parse_metrics_reads_buckets_without_a_type_line() {
        let untyped: String = POD_TEXT
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(parse_metrics(&untyped), parse_metrics(POD_TEXT));
    }

    #[test]
    fn parse_metrics_of_garbage_is_empty() {
        let sample = parse_metrics("not metrics\nquery_latency_count{query_type=\"row\"} x\n");
        assert_eq!(sample, PodSample::default());
    }

    #[test]
    fn parse_metrics_leaves_out_nan() {
        let text = "# TYPE query_latency histogram\n\
                    query_latency_count{query_type=\"row\"} NaN\n\
                    query_latency_count{query_type=\"list\"} 2\n\
                    query_latency_bucket{le=\"NaN\",query_type=\"list\"} 1\n\
                    query_latency_bucket{le=\"+Inf\",query_type=\"list\"} 2\n";
        assert_eq!(
            parse_metrics(text),
            PodSample {
                count: 2.0,
                buckets: vec![(f64::INFINITY, 2.0)],
            }
        );
    }

    fn pod(phase: &str, ready: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "query-1", "uid": "u-1"},
            "status": {
                "phase": phase,
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": ready}],
            },
        }))
        .unwrap()
    }

    #[test]
    fn only_running_ready_pods_with_an_ip_are_scraped() {
        assert_eq!(
            scrape_target(&pod("Running", "True", Some("10.0.0.7"))),
            Some(("u-1".into(), "http://10.0.0.7:9090/metrics".into()))
        );
        assert_eq!(
            scrape_target(&pod("Running", "True", Some("fd00::7")))
                .unwrap()
                .1,
            "http://[fd00::7]:9090/metrics"
        );
        assert_eq!(
            scrape_target(&pod("Pending", "True", Some("10.0.0.7"))),
            None
        );
        assert_eq!(
            scrape_target(&pod("Running", "False", Some("10.0.0.7"))),
            None
        );
        assert_eq!(scrape_target(&pod("Running", "True", None)), None);
    }
}
