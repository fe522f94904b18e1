//! Read-path scaling of a Projection's query Deployment, as a pure
//! decision: from the Deployment and the signals of the read path to the
//! replica count they call for (stabilized like the HorizontalPodAutoscaler:
//! up fast, down slowly), why, and what to remember for the next reconcile.
//! Its submodules own the stabilization windows, the signals between two
//! scrapes, the scrape of the query pods and the ownership of the
//! Deployment's `spec.replicas`.

pub mod ownership;
pub mod scrape;
pub mod signals;
pub mod stabilize;

use chrono::{DateTime, Utc};
use eventplane_api::ScalingSpec;

use scrape::Scrape;
use stabilize::Recommendations;

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

/// What scaling remembers of a projection between reconciles.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    pub history: Recommendations,
    pub scrape: Option<Scrape>,
}

/// The query Deployment as a reconcile found it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadPath {
    pub deployment: String,
    /// Its `spec.replicas`.
    pub replicas: i32,
    /// Its `matchLabels` as a label selector; empty when it has none.
    pub selector: String,
    /// What its pods showed; `None` without a selector: no pods to
    /// measure, and the Deployment is not scaled.
    pub measured: Option<Measured>,
}

/// The read path measured in one reconcile, and what earlier ones left.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Query rate and P99 since the previous scrape; lag and rebuilding
    /// are filled in by [`step`].
    pub signals: Signals,
    pub scrape: Scrape,
    pub history: Recommendations,
}

/// What scaling decides in one reconcile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    /// The status' `replicas` and `selector`: the Deployment's, for the
    /// scale subresource.
    pub replicas: Option<i32>,
    pub selector: Option<String>,
    /// The replica count to apply to `deployment`.
    pub scale: Option<(String, ScaleDecision)>,
    /// To keep for the next reconcile; `None` leaves the memory as it was.
    pub memory: Option<Memory>,
}

/// The Deployment a projection's read path runs in:
/// `spec.scaling.deployment`, by default `<projection>-query`.
pub fn deployment_name(projection: &str, spec: &ScalingSpec) -> String {
    spec.deployment
        .clone()
        .unwrap_or_else(|| format!("{projection}-query"))
}

/// The scaling part of a reconcile's decision. `lag_seconds` and
/// `rebuilding` come from the projection's own decision: the query pods do
/// not know them.
pub fn step(
    spec: &ScalingSpec,
    read_path: Option<ReadPath>,
    lag_seconds: Option<f64>,
    rebuilding: bool,
    now: DateTime<Utc>,
) -> Step {
    let Some(read_path) = read_path else {
        return Step::default();
    };
    let mut step = Step {
        replicas: Some(read_path.replicas),
        selector: Some(read_path.selector).filter(|s| !s.is_empty()),
        ..Step::default()
    };
    let Some(measured) = read_path.measured else {
        return step;
    };
    let signals = Signals {
        lag_seconds,
        rebuilding,
        ..measured.signals
    };
    let mut history = measured.history;
    let decision = desired_replicas(spec, &signals, &mut history, now, read_path.replicas);
    step.scale = Some((read_path.deployment, decision));
    step.memory = Some(Memory {
        history,
        scrape: Some(measured.scrape),
    });
    step
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

    let stabilized = stabilize::stabilize(spec, history, now, raw.replicas, current);
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

/// Inputs shared by the tests of this module and its submodules.
#[cfg(test)]
mod fixtures {
    use super::*;

    pub(super) fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    pub(super) fn spec() -> ScalingSpec {
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

    pub(super) fn rate(rate: f64) -> Signals {
        Signals {
            query_rate: Some(rate),
            ..Signals::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{at, rate, spec};
    use super::*;

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

    fn read_path(selector: &str, measured: Option<Measured>) -> ReadPath {
        ReadPath {
            deployment: "orders-query".into(),
            replicas: 2,
            selector: selector.into(),
            measured,
        }
    }

    #[test]
    fn without_a_deployment_nothing_is_scaled_or_remembered() {
        assert_eq!(
            step(&spec(), None, Some(9.0), false, at(0)),
            Step::default()
        );
    }

    #[test]
    fn a_deployment_without_a_selector_is_reported_but_not_scaled() {
        let step = step(&spec(), Some(read_path("", None)), None, false, at(0));
        assert_eq!(
            step,
            Step {
                replicas: Some(2),
                ..Step::default()
            }
        );
    }

    #[test]
    fn the_projection_lag_joins_the_measured_signals_and_the_scrape_is_kept() {
        let scrape = Scrape {
            at: at(0),
            pods: Default::default(),
        };
        let measured = Measured {
            signals: rate(150.0),
            scrape: scrape.clone(),
            history: Recommendations::default(),
        };
        let lagging = step(
            &spec(),
            Some(read_path("app=orders-query", Some(measured.clone()))),
            Some(9.0),
            false,
            at(0),
        );
        assert_eq!(lagging.replicas, Some(2));
        assert_eq!(lagging.selector.as_deref(), Some("app=orders-query"));
        let (deployment, decision) = lagging.scale.unwrap();
        assert_eq!(
            (deployment.as_str(), decision.replicas, decision.reason),
            ("orders-query", 3, reason::LAG)
        );
        let memory = lagging.memory.unwrap();
        assert_eq!(memory.scrape, Some(scrape));
        assert_eq!(memory.history.iter().count(), 1);

        let rebuilding = step(
            &spec(),
            Some(read_path("app=orders-query", Some(measured))),
            Some(9.0),
            true,
            at(0),
        );
        assert_eq!(rebuilding.scale.unwrap().1.reason, reason::QUERY_RATE);
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
}
