//! The read-path signals between two scrapes of the query pods: the query
//! rate and the P99 latency of the interval, from the pods' cumulative
//! `query_latency` counters.

use super::Signals;
use super::scrape::{PodSample, Scrape, merge_buckets};

/// The quantile the latency target is stated in.
const LATENCY_QUANTILE: f64 = 0.99;

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

#[cfg(test)]
mod tests {
    use super::super::fixtures::at;
    use super::*;

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
}
