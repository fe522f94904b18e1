//! Read-path scaling of a Projection's query Deployment: the signals scraped
//! from its query pods, the replica count they call for (stabilized like the
//! HorizontalPodAutoscaler: up fast, down slowly), and applying that count
//! without fighting another owner of the Deployment's replicas.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use eventplane_api::ScalingSpec;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::context::MANAGER;

/// Field manager of the replicas patch. It differs from [`MANAGER`] because
/// a server-side apply releases every field its manager applied before and
/// left out this time: under the operator's own manager, a patch carrying
/// only `spec.replicas` would drop the rest of a Deployment the operator
/// built.
pub const SCALING_MANAGER: &str = "eventplane-operator-scaling";

/// Port and path where query pods serve Prometheus metrics.
const METRICS_PORT: u16 = 8080;

/// A scrape slower than this is skipped: a pod that cannot answer in time
/// is no signal, and the reconcile must not wait on it.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The quantile the latency target is stated in.
const LATENCY_QUANTILE: f64 = 0.99;

/// Field managers Kubernetes records for the client that created an object;
/// on a Deployment the operator manages, their claim on `spec.replicas` is
/// only the creation-time value, safe to take over.
const CREATION_MANAGERS: [&str; 3] = [
    "kubectl-create",
    "kubectl-client-side-apply",
    "before-first-apply",
];

const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Why a replica count was chosen, as reported in the Projection's status
/// and Events.
pub mod reason {
    pub const QUERY_RATE: &str = "QueryRate";
    pub const LATENCY: &str = "Latency";
    pub const LAG: &str = "Lag";
    pub const STABILIZED: &str = "Stabilized";
    pub const SCALE_SUBRESOURCE: &str = "ScaleSubresource";
    pub const NO_SIGNALS: &str = "NoSignals";
    pub const BOUNDS: &str = "Bounds";
}

/// What the read path looks like right now. `None` means not observed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signals {
    /// Queries per second, summed over the query pods.
    pub query_rate: Option<f64>,
    /// Query P99 latency over the last interval, in milliseconds.
    pub p99_ms: Option<f64>,
    /// Projection lag, in seconds.
    pub lag_seconds: Option<f64>,
    /// A rebuild is catching up; its lag is expected and no reason to scale.
    pub rebuilding: bool,
}

/// The replica count to run and why.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleDecision {
    pub replicas: i32,
    pub reason: &'static str,
    pub message: String,
}

/// One raw recommendation and when it was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub at: DateTime<Utc>,
    pub replicas: i32,
}

/// Past raw recommendations of one projection, newest last. Only the newest
/// occurrence of each replica count is kept, and nothing older than the
/// longest stabilization window: a window always ends now, so the values
/// inside it are exactly those whose newest occurrence falls inside it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Recommendations(Vec<Recommendation>);

impl Recommendations {
    pub fn iter(&self) -> impl Iterator<Item = &Recommendation> {
        self.0.iter()
    }

    fn record(&mut self, now: DateTime<Utc>, replicas: i32, keep: chrono::Duration) {
        self.0
            .retain(|r| r.replicas != replicas && now - r.at <= keep);
        self.0.push(Recommendation { at: now, replicas });
    }

    fn within(&self, now: DateTime<Utc>, window: chrono::Duration) -> impl Iterator<Item = i32> {
        self.0
            .iter()
            .filter(move |r| now - r.at <= window)
            .map(|r| r.replicas)
    }
}

/// The raw recommendation before stabilization.
struct Raw {
    replicas: i32,
    reason: &'static str,
    message: String,
}

/// The replica count the read path should run now.
///
/// `current` is the Deployment's replica count. `history` carries the raw
/// recommendations of earlier calls for this projection and is updated.
pub fn desired_replicas(
    spec: &ScalingSpec,
    signals: &Signals,
    history: &mut Recommendations,
    now: DateTime<Utc>,
    current: i32,
) -> ScaleDecision {
    if let Some(replicas) = spec.replicas {
        let replicas = replicas.max(0);
        return ScaleDecision {
            replicas,
            reason: reason::SCALE_SUBRESOURCE,
            message: format!(
                "{replicas} replicas set through the scale subresource (spec.scaling.replicas); autoscaling is off"
            ),
        };
    }
    let (low, high) = bounds(spec);
    let current = current.max(0);
    let Some(raw) = recommend(spec, signals, current, low, high) else {
        let replicas = current.clamp(low, high);
        return if replicas == current {
            ScaleDecision {
                replicas,
                reason: reason::NO_SIGNALS,
                message: format!("no query pod could be measured; keeping {replicas} replicas"),
            }
        } else {
            ScaleDecision {
                replicas,
                reason: reason::BOUNDS,
                message: format!(
                    "no query pod could be measured; {current} replicas moved into [{low}, {high}]"
                ),
            }
        };
    };

    let up_window = chrono::Duration::seconds(spec.scale_up_stabilization_seconds.into());
    let down_window = chrono::Duration::seconds(spec.scale_down_stabilization_seconds.into());
    history.record(now, raw.replicas, up_window.max(down_window));
    // Scale up only as far as every recommendation in the up window agrees,
    // and down only as far as every one in the down window agrees.
    let up_to = history.within(now, up_window).min().unwrap_or(raw.replicas);
    let down_to = history
        .within(now, down_window)
        .max()
        .unwrap_or(raw.replicas);
    let stabilized = if current < up_to {
        up_to
    } else if current > down_to {
        down_to
    } else {
        current
    };
    // Earlier recommendations were clamped to the bounds of their day.
    let replicas = stabilized.clamp(low, high);

    if replicas == raw.replicas {
        ScaleDecision {
            replicas,
            reason: raw.reason,
            message: raw.message,
        }
    } else if replicas != stabilized {
        ScaleDecision {
            replicas,
            reason: reason::BOUNDS,
            message: format!("{stabilized} replicas moved into [{low}, {high}]"),
        }
    } else {
        let held = if raw.replicas > replicas {
            format!(
                "scaling up once it has been wanted for {}s",
                spec.scale_up_stabilization_seconds
            )
        } else {
            format!(
                "scaling down once no more has been wanted for {}s",
                spec.scale_down_stabilization_seconds
            )
        };
        ScaleDecision {
            replicas,
            reason: reason::STABILIZED,
            message: format!("keeping {replicas} replicas ({}); {held}", raw.message),
        }
    }
}

/// The autoscaling bounds, made consistent: never negative, never inverted.
fn bounds(spec: &ScalingSpec) -> (i32, i32) {
    let low = spec.min_replicas.max(0);
    (low, spec.max_replicas.max(low))
}

fn recommend(
    spec: &ScalingSpec,
    signals: &Signals,
    current: i32,
    low: i32,
    high: i32,
) -> Option<Raw> {
    if signals.query_rate.is_none() && signals.p99_ms.is_none() && signals.lag_seconds.is_none() {
        return None;
    }
    let mut raw = match signals.query_rate {
        Some(rate) => {
            let target = spec.target_requests_per_replica.max(1);
            // `as` saturates, so an absurd rate ends at the upper bound.
            let replicas = (rate.max(0.0) / f64::from(target)).ceil() as i32;
            Raw {
                replicas,
                reason: reason::QUERY_RATE,
                message: format!("{rate:.1} queries/s at {target}/s per replica"),
            }
        }
        None => Raw {
            replicas: current,
            reason: reason::NO_SIGNALS,
            message: "query rate not measured".to_string(),
        },
    };
    let one_more = current.saturating_add(1);
    if let Some(p99) = signals.p99_ms
        && p99 > f64::from(spec.target_p99_ms)
        && raw.replicas < one_more
    {
        raw = Raw {
            replicas: one_more,
            reason: reason::LATENCY,
            message: format!("query P99 {p99:.1} ms above {} ms", spec.target_p99_ms),
        };
    }
    if let Some(lag) = signals.lag_seconds
        && !signals.rebuilding
        && lag > f64::from(spec.max_lag_seconds)
        && raw.replicas < one_more
    {
        raw = Raw {
            replicas: one_more,
            reason: reason::LAG,
            message: format!("projection lag {lag:.1}s above {}s", spec.max_lag_seconds),
        };
    }
    let clamped = raw.replicas.clamp(low, high);
    if clamped != raw.replicas {
        raw = Raw {
            replicas: clamped,
            reason: reason::BOUNDS,
            message: format!(
                "{} replicas wanted ({}), bounded to [{low}, {high}]",
                raw.replicas, raw.message
            ),
        };
    }
    Some(raw)
}

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

/// Reads the `query_latency` histogram out of a pod's Prometheus text.
/// Lines it does not understand are ignored.
pub fn parse_metrics(text: &str) -> PodSample {
    let mut sample = PodSample::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else {
            continue;
        };
        match name {
            "query_latency_count" => sample.count += value,
            "query_latency_bucket" => {
                let Some(le) = label(labels, "le").and_then(parse_number) else {
                    continue;
                };
                sample.buckets.push((le, value));
            }
            _ => {}
        }
    }
    sample.buckets = merge_buckets(sample.buckets);
    sample
}

/// `name{labels} value [timestamp] [# exemplar]` → (name, labels, value).
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let (labels, rest) = if line[name_end..].starts_with('{') {
        let close = labels_end(&line[name_end..])?;
        (
            &line[name_end + 1..name_end + close],
            &line[name_end + close + 1..],
        )
    } else {
        ("", &line[name_end..])
    };
    let value = parse_number(rest.split_whitespace().next()?)?;
    Some((name, labels, value))
}

/// Index of the `}` closing a label set that starts at `s[0] == '{'`,
/// skipping braces inside quoted values.
fn labels_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim().trim_start_matches(',').trim();
        let after = rest[eq + 1..].strip_prefix('"')?;
        let close = after
            .char_indices()
            .scan(false, |escaped, (i, c)| {
                let found = !*escaped && c == '"';
                *escaped = !*escaped && c == '\\';
                Some((i, found))
            })
            .find(|&(_, found)| found)?
            .0;
        if name == key {
            return Some(&after[..close]);
        }
        rest = &after[close + 1..];
    }
    None
}

fn parse_number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok().filter(|v: &f64| !v.is_nan()),
    }
}

/// Sorts buckets by bound and adds up those with the same bound (one per
/// query type, or one per pod).
fn merge_buckets(mut buckets: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
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

/// Query rate and P99 between two scrapes. Only pods present in both count:
/// a pod seen for the first time has no interval yet. A pod whose counter
/// went down has restarted and counts from zero.
pub fn signals_between(previous: Option<&Scrape>, current: &Scrape) -> Signals {
    let none = Signals::default();
    let Some(previous) = previous else {
        return none;
    };
    let seconds = (current.at - previous.at).as_seconds_f64();
    if seconds <= 0.0 {
        return none;
    }
    let mut measured = false;
    let mut served = 0.0;
    let mut buckets = Vec::new();
    for (pod, now) in &current.pods {
        let Some(before) = previous.pods.get(pod) else {
            continue;
        };
        measured = true;
        let (count, delta) = delta(before, now);
        served += count;
        buckets.extend(delta);
    }
    if !measured {
        return none;
    }
    let buckets = merge_buckets(buckets);
    Signals {
        query_rate: Some(served / seconds),
        p99_ms: quantile(LATENCY_QUANTILE, &buckets).map(|s| s * 1000.0),
        ..none
    }
}

/// Queries served between two samples of one pod, and their buckets.
fn delta(before: &PodSample, now: &PodSample) -> (f64, Vec<(f64, f64)>) {
    if now.count < before.count {
        return (now.count, now.buckets.clone());
    }
    let buckets = now
        .buckets
        .iter()
        .map(|&(le, count)| {
            let earlier = before
                .buckets
                .iter()
                .find(|b| b.0 == le)
                .map_or(0.0, |b| b.1);
            (le, (count - earlier).max(0.0))
        })
        .collect();
    (now.count - before.count, buckets)
}

/// The `q` quantile of a cumulative histogram, interpolating linearly
/// inside the bucket it falls in (as Prometheus' `histogram_quantile`
/// does). A quantile in the `+Inf` bucket is reported as the highest finite
/// bound. `None` when the histogram is empty.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            if count <= below {
                return Some(le);
            }
            return Some(lower + (le - lower) * (rank - below) / (count - below));
        }
        (lower, below) = (le, count);
    }
    Some(lower)
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

/// What [`apply_replicas`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The replica count was changed.
    Applied { from: i32, to: i32 },
    /// The Deployment already runs that many replicas.
    Unchanged,
    /// Another field manager owns the Deployment's replicas; nothing was
    /// changed.
    OwnedBy(String),
    /// The Deployment does not exist.
    Missing,
}

/// What to do with a Deployment, decided from its current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyPlan {
    OwnedBy(String),
    Unchanged,
    /// Apply; `force` takes `spec.replicas` over from managers that may be
    /// overridden (see [`replicas_blocker`]).
    Apply {
        from: i32,
        force: bool,
    },
}

/// Every field manager that owns the Deployment's `spec.replicas`.
pub fn replicas_owners(deployment: &Deployment) -> Vec<String> {
    let mut owners: Vec<String> = deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| {
            entry
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|spec| spec.get("f:replicas"))
                .is_some()
        })
        .filter_map(|entry| entry.manager.clone())
        .collect();
    owners.sort();
    owners.dedup();
    owners
}

/// The manager whose claim on `spec.replicas` the operator must respect, if
/// any. On a Deployment labelled as managed by the operator, the managers
/// that merely created it do not count; on any other Deployment every
/// other manager does.
pub fn replicas_blocker(deployment: &Deployment) -> Option<String> {
    let ours = deployment
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGER);
    replicas_owners(deployment).into_iter().find(|m| {
        m != MANAGER && m != SCALING_MANAGER && !(ours && CREATION_MANAGERS.contains(&m.as_str()))
    })
}

pub fn plan_apply(deployment: &Deployment, replicas: i32) -> ApplyPlan {
    if let Some(owner) = replicas_blocker(deployment) {
        return ApplyPlan::OwnedBy(owner);
    }
    // The API server defaults an unset count to 1.
    let from = deployment.spec.replicas.unwrap_or(1);
    if from == replicas {
        return ApplyPlan::Unchanged;
    }
    ApplyPlan::Apply {
        from,
        // Force only to take the field over from the managers allowed above
        // (the operator's own Deployment apply among them); otherwise a
        // conflict must surface: someone claimed the field since it was read.
        force: replicas_owners(deployment)
            .iter()
            .any(|m| m != SCALING_MANAGER),
    }
}

/// The manager named in a server-side apply conflict message, e.g.
/// `Apply failed with 1 conflict: conflict with "kubectl-edit" using apps/v1: .spec.replicas`.
fn conflict_manager(message: &str) -> String {
    message
        .split_once("conflict with \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or_else(|| "unknown".to_string(), |(m, _)| m.to_string())
}

/// Sets the Deployment's replica count with a server-side apply of
/// `spec.replicas` alone, unless another field manager owns it (for example
/// an HPA scaling the Deployment directly): that owner is reported and the
/// Deployment left alone.
pub async fn apply_replicas(
    client: &Client,
    namespace: &str,
    deployment: &str,
    replicas: i32,
) -> kube::Result<ApplyOutcome> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let Some(current) = api.get_opt(deployment).await? else {
        return Ok(ApplyOutcome::Missing);
    };
    let (from, force) = match plan_apply(&current, replicas) {
        ApplyPlan::OwnedBy(owner) => return Ok(ApplyOutcome::OwnedBy(owner)),
        ApplyPlan::Unchanged => return Ok(ApplyOutcome::Unchanged),
        ApplyPlan::Apply { from, force } => (from, force),
    };
    let patch: Value = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "spec": {"replicas": replicas},
    });
    let mut params = PatchParams::apply(SCALING_MANAGER);
    if force {
        params = params.force();
    }
    match api.patch(deployment, &params, &Patch::Apply(&patch)).await {
        Ok(_) => Ok(ApplyOutcome::Applied { from, to: replicas }),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Ok(ApplyOutcome::OwnedBy(conflict_manager(&status.message)))
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn spec() -> ScalingSpec {
        ScalingSpec {
            min_replicas: 1,
            max_replicas: 10,
            target_requests_per_replica: 100,
            target_p99_ms: 50,
            max_lag_seconds: 5,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 300,
            ..ScalingSpec::default()
        }
    }

    fn rate(rate: f64) -> Signals {
        Signals {
            query_rate: Some(rate),
            ..Signals::default()
        }
    }

    fn decide(spec: &ScalingSpec, signals: &Signals, current: i32) -> ScaleDecision {
        desired_replicas(
            spec,
            signals,
            &mut Recommendations::default(),
            at(0),
            current,
        )
    }

    #[test]
    fn query_rate_sets_replicas_by_the_per_replica_target() {
        for (queries, want) in [(0.0, 1), (50.0, 1), (100.0, 1), (101.0, 2), (950.0, 10)] {
            let decision = decide(&spec(), &rate(queries), 1);
            assert_eq!(decision.replicas, want, "{queries} queries/s");
        }
        assert_eq!(decide(&spec(), &rate(250.0), 3).reason, reason::QUERY_RATE);
    }

    #[test]
    fn p99_above_target_adds_one_replica() {
        let signals = Signals {
            p99_ms: Some(80.0),
            ..rate(150.0)
        };
        let decision = decide(&spec(), &signals, 3);
        assert_eq!((decision.replicas, decision.reason), (4, reason::LATENCY));

        let fast = Signals {
            p99_ms: Some(20.0),
            ..rate(150.0)
        };
        assert_eq!(decide(&spec(), &fast, 2).replicas, 2);
    }

    #[test]
    fn lag_above_bound_adds_one_replica() {
        let signals = Signals {
            lag_seconds: Some(9.0),
            ..rate(150.0)
        };
        let decision = decide(&spec(), &signals, 2);
        assert_eq!((decision.replicas, decision.reason), (3, reason::LAG));
    }

    #[test]
    fn lag_is_ignored_while_a_rebuild_catches_up() {
        let signals = Signals {
            lag_seconds: Some(600.0),
            rebuilding: true,
            ..rate(150.0)
        };
        let decision = decide(&spec(), &signals, 2);
        assert_eq!(
            (decision.replicas, decision.reason),
            (2, reason::QUERY_RATE)
        );
    }

    #[test]
    fn recommendations_are_clamped_to_min_and_max() {
        let many = decide(&spec(), &rate(5_000.0), 4);
        assert_eq!((many.replicas, many.reason), (10, reason::BOUNDS));
        let floor = ScalingSpec {
            min_replicas: 2,
            ..spec()
        };
        let few = decide(&floor, &rate(0.0), 2);
        assert_eq!((few.replicas, few.reason), (2, reason::BOUNDS));
        let breach = Signals {
            p99_ms: Some(500.0),
            ..rate(900.0)
        };
        assert_eq!(decide(&spec(), &breach, 10).replicas, 10);
    }

    #[test]
    fn inverted_bounds_do_not_panic() {
        let odd = ScalingSpec {
            min_replicas: 5,
            max_replicas: 2,
            ..spec()
        };
        assert_eq!(decide(&odd, &rate(0.0), 3).replicas, 5);
        assert_eq!(decide(&odd, &Signals::default(), 9).replicas, 5);
    }

    #[test]
    fn scale_up_happens_immediately() {
        let mut history = Recommendations::default();
        desired_replicas(&spec(), &rate(100.0), &mut history, at(0), 1);
        let decision = desired_replicas(&spec(), &rate(600.0), &mut history, at(15), 1);
        assert_eq!(
            (decision.replicas, decision.reason),
            (6, reason::QUERY_RATE)
        );
    }

    #[test]
    fn scale_up_waits_for_its_window_when_one_is_set() {
        let slow = ScalingSpec {
            scale_up_stabilization_seconds: 60,
            ..spec()
        };
        let mut history = Recommendations::default();
        desired_replicas(&slow, &rate(100.0), &mut history, at(0), 1);
        let early = desired_replicas(&slow, &rate(600.0), &mut history, at(30), 1);
        assert_eq!((early.replicas, early.reason), (1, reason::STABILIZED));
        let later = desired_replicas(&slow, &rate(600.0), &mut history, at(61), 1);
        assert_eq!(later.replicas, 6);
    }

    #[test]
    fn scale_down_happens_only_after_the_window() {
        let mut history = Recommendations::default();
        desired_replicas(&spec(), &rate(400.0), &mut history, at(0), 4);
        let early = desired_replicas(&spec(), &rate(100.0), &mut history, at(60), 4);
        assert_eq!((early.replicas, early.reason), (4, reason::STABILIZED));
        let edge = desired_replicas(&spec(), &rate(100.0), &mut history, at(300), 4);
        assert_eq!(edge.replicas, 4);
        let after = desired_replicas(&spec(), &rate(100.0), &mut history, at(301), 4);
        assert_eq!((after.replicas, after.reason), (1, reason::QUERY_RATE));
    }

    #[test]
    fn a_spike_within_the_down_window_keeps_replicas() {
        let mut history = Recommendations::default();
        desired_replicas(&spec(), &rate(100.0), &mut history, at(0), 1);
        let spike = desired_replicas(&spec(), &rate(500.0), &mut history, at(100), 1);
        assert_eq!(spike.replicas, 5);
        let calm = desired_replicas(&spec(), &rate(100.0), &mut history, at(200), 5);
        assert_eq!(calm.replicas, 5);
        let still = desired_replicas(&spec(), &rate(200.0), &mut history, at(399), 5);
        assert_eq!(still.replicas, 5);
        // The spike left the window; the highest since is 2.
        let down = desired_replicas(&spec(), &rate(100.0), &mut history, at(401), 5);
        assert_eq!((down.replicas, down.reason), (2, reason::STABILIZED));
    }

    #[test]
    fn history_keeps_one_entry_per_count_within_the_longest_window() {
        let mut history = Recommendations::default();
        for step in 0..100 {
            desired_replicas(&spec(), &rate(100.0), &mut history, at(step), 1);
        }
        desired_replicas(&spec(), &rate(300.0), &mut history, at(100), 1);
        assert_eq!(history.iter().count(), 2);
        desired_replicas(&spec(), &rate(300.0), &mut history, at(1000), 3);
        assert_eq!(history.iter().count(), 1);
        let round_trip: Recommendations =
            serde_json::from_value(serde_json::to_value(&history).unwrap()).unwrap();
        assert_eq!(round_trip, history);
    }

    #[test]
    fn scale_subresource_value_wins() {
        let owned = ScalingSpec {
            replicas: Some(25),
            ..spec()
        };
        let decision = decide(&owned, &rate(0.0), 3);
        assert_eq!(
            (decision.replicas, decision.reason),
            (25, reason::SCALE_SUBRESOURCE)
        );
        let zero = ScalingSpec {
            replicas: Some(0),
            ..spec()
        };
        assert_eq!(decide(&zero, &rate(900.0), 3).replicas, 0);
    }

    #[test]
    fn no_signals_keeps_current_replicas() {
        let decision = decide(&spec(), &Signals::default(), 3);
        assert_eq!(
            (decision.replicas, decision.reason),
            (3, reason::NO_SIGNALS)
        );
        let above = decide(&spec(), &Signals::default(), 12);
        assert_eq!((above.replicas, above.reason), (10, reason::BOUNDS));
    }

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
    fn parse_metrics_of_garbage_is_empty() {
        let sample = parse_metrics("not metrics\nquery_latency_count{query_type=\"row\"} x\n");
        assert_eq!(sample, PodSample::default());
    }

    fn pod_sample(count: f64, buckets: &[(f64, f64)]) -> PodSample {
        PodSample {
            count,
            buckets: buckets.to_vec(),
        }
    }

    fn scrape(at_seconds: i64, pods: &[(&str, PodSample)]) -> Scrape {
        Scrape {
            at: at(at_seconds),
            pods: pods
                .iter()
                .map(|(k, s)| (k.to_string(), s.clone()))
                .collect(),
        }
    }

    const INF: f64 = f64::INFINITY;

    #[test]
    fn rate_is_the_count_delta_summed_over_pods() {
        let before = scrape(
            0,
            &[
                ("a", pod_sample(1000.0, &[(0.01, 1000.0), (INF, 1000.0)])),
                ("b", pod_sample(500.0, &[(0.01, 500.0), (INF, 500.0)])),
            ],
        );
        let after = scrape(
            10,
            &[
                ("a", pod_sample(3000.0, &[(0.01, 3000.0), (INF, 3000.0)])),
                ("b", pod_sample(1500.0, &[(0.01, 1500.0), (INF, 1500.0)])),
            ],
        );
        let signals = signals_between(Some(&before), &after);
        assert_eq!(signals.query_rate, Some(300.0));
    }

    #[test]
    fn a_restarted_pod_counts_from_zero() {
        let before = scrape(0, &[("a", pod_sample(5000.0, &[(INF, 5000.0)]))]);
        let after = scrape(10, &[("a", pod_sample(200.0, &[(INF, 200.0)]))]);
        assert_eq!(
            signals_between(Some(&before), &after).query_rate,
            Some(20.0)
        );
    }

    #[test]
    fn a_pod_seen_once_has_no_rate_yet() {
        let first = scrape(0, &[("a", pod_sample(100.0, &[(INF, 100.0)]))]);
        assert_eq!(signals_between(None, &first), Signals::default());
        let other = scrape(10, &[("b", pod_sample(100.0, &[(INF, 100.0)]))]);
        assert_eq!(signals_between(Some(&first), &other), Signals::default());
        let mixed = scrape(
            10,
            &[
                ("a", pod_sample(150.0, &[(INF, 150.0)])),
                ("b", pod_sample(9000.0, &[(INF, 9000.0)])),
            ],
        );
        assert_eq!(signals_between(Some(&first), &mixed).query_rate, Some(5.0));
    }

    #[test]
    fn p99_interpolates_inside_the_bucket_of_the_interval() {
        // Before: 100 fast queries. In the interval: 100 queries, 90 under
        // 10 ms and 10 between 10 and 110 ms. Rank 99 is the 9th of the 10
        // slow ones: 10 + 100 * 9/10 = 100 ms.
        let before = scrape(
            0,
            &[(
                "a",
                pod_sample(100.0, &[(0.01, 100.0), (0.11, 100.0), (INF, 100.0)]),
            )],
        );
        let after = scrape(
            10,
            &[(
                "a",
                pod_sample(200.0, &[(0.01, 190.0), (0.11, 200.0), (INF, 200.0)]),
            )],
        );
        let p99 = signals_between(Some(&before), &after).p99_ms.unwrap();
        assert!((p99 - 100.0).abs() < 1e-9, "{p99}");
    }

    #[test]
    fn p99_sums_buckets_over_pods() {
        let before = scrape(
            0,
            &[
                (
                    "a",
                    pod_sample(0.0, &[(0.01, 0.0), (0.02, 0.0), (INF, 0.0)]),
                ),
                (
                    "b",
                    pod_sample(0.0, &[(0.01, 0.0), (0.02, 0.0), (INF, 0.0)]),
                ),
            ],
        );
        let after = scrape(
            1,
            &[
                (
                    "a",
                    pod_sample(100.0, &[(0.01, 100.0), (0.02, 100.0), (INF, 100.0)]),
                ),
                (
                    "b",
                    pod_sample(100.0, &[(0.01, 0.0), (0.02, 100.0), (INF, 100.0)]),
                ),
            ],
        );
        // Rank 198 of 200: 98 of the 100 in (10 ms, 20 ms].
        let p99 = signals_between(Some(&before), &after).p99_ms.unwrap();
        assert!((p99 - 19.8).abs() < 1e-9, "{p99}");
    }

    #[test]
    fn p99_is_absent_without_queries_and_capped_at_the_last_bound() {
        assert_eq!(quantile(0.99, &[(0.01, 0.0), (INF, 0.0)]), None);
        assert_eq!(quantile(0.99, &[(0.01, 1.0), (INF, 100.0)]), Some(0.01));
        assert_eq!(
            quantile(0.5, &[(0.01, 10.0), (0.02, 10.0), (INF, 10.0)]),
            Some(0.005)
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
            Some(("u-1".into(), "http://10.0.0.7:8080/metrics".into()))
        );
        assert_eq!(
            scrape_target(&pod("Running", "True", Some("fd00::7")))
                .unwrap()
                .1,
            "http://[fd00::7]:8080/metrics"
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

    fn deployment(labels: Value, replicas: i32, owners: &[(&str, Option<&str>)]) -> Deployment {
        let mut d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "orders-query", "labels": labels},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
        }))
        .unwrap();
        d.metadata.managed_fields = Some(
            owners
                .iter()
                .map(|(manager, subresource)| ManagedFieldsEntry {
                    manager: Some(manager.to_string()),
                    operation: Some("Update".into()),
                    subresource: subresource.map(str::to_string),
                    fields_v1: Some(FieldsV1(json!({"f:spec": {"f:replicas": {}}}))),
                    ..ManagedFieldsEntry::default()
                })
                .collect(),
        );
        d
    }

    #[test]
    fn a_replicas_owner_other_than_the_operator_blocks_scaling() {
        let hpa = deployment(
            json!({MANAGED_BY_LABEL: MANAGER}),
            2,
            &[("kube-controller-manager", Some("scale"))],
        );
        assert_eq!(
            plan_apply(&hpa, 3),
            ApplyPlan::OwnedBy("kube-controller-manager".into())
        );
    }

    #[test]
    fn creation_managers_are_taken_over_only_on_operator_deployments() {
        let ours = deployment(
            json!({MANAGED_BY_LABEL: MANAGER}),
            2,
            &[("kubectl-create", None)],
        );
        assert_eq!(
            plan_apply(&ours, 3),
            ApplyPlan::Apply {
                from: 2,
                force: true
            }
        );
        let theirs = deployment(json!({}), 2, &[("kubectl-create", None)]);
        assert_eq!(
            plan_apply(&theirs, 3),
            ApplyPlan::OwnedBy("kubectl-create".into())
        );
    }

    #[test]
    fn unowned_replicas_are_applied_without_force() {
        let free = deployment(json!({}), 2, &[]);
        assert_eq!(
            plan_apply(&free, 5),
            ApplyPlan::Apply {
                from: 2,
                force: false
            }
        );
        let again = deployment(json!({}), 2, &[(SCALING_MANAGER, None)]);
        assert_eq!(
            plan_apply(&again, 4),
            ApplyPlan::Apply {
                from: 2,
                force: false
            }
        );
        assert_eq!(plan_apply(&again, 2), ApplyPlan::Unchanged);
    }

    #[test]
    fn replicas_the_operator_applied_with_the_deployment_are_taken_over() {
        let built = deployment(json!({}), 2, &[(MANAGER, None), (SCALING_MANAGER, None)]);
        assert_eq!(
            plan_apply(&built, 3),
            ApplyPlan::Apply {
                from: 2,
                force: true
            }
        );
    }

    #[test]
    fn the_conflicting_manager_is_read_from_the_conflict_message() {
        assert_eq!(
            conflict_manager(
                "Apply failed with 1 conflict: conflict with \"kubectl-edit\" using apps/v1: .spec.replicas"
            ),
            "kubectl-edit"
        );
        assert_eq!(conflict_manager("Conflict"), "unknown");
    }
}
