//! Stabilization of replica recommendations, as the HorizontalPodAutoscaler
//! does it: the history of raw recommendations and the scale-up and
//! scale-down windows that hold a change until every recommendation in its
//! window agrees.

use chrono::{DateTime, Utc};
use eventplane_api::ScalingSpec;
use serde::{Deserialize, Serialize};

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

/// Records the raw recommendation `recommended` and returns the replica
/// count the windows allow from `current`.
pub(super) fn stabilize(
    spec: &ScalingSpec,
    history: &mut Recommendations,
    now: DateTime<Utc>,
    recommended: i32,
    current: i32,
) -> i32 {
    let up_window = chrono::Duration::seconds(spec.scale_up_stabilization_seconds.into());
    let down_window = chrono::Duration::seconds(spec.scale_down_stabilization_seconds.into());
    history.record(now, recommended, up_window.max(down_window));
    // Scale up only as far as every recommendation in the up window agrees,
    // and down only as far as every one in the down window agrees.
    let up_to = history.within(now, up_window).min().unwrap_or(recommended);
    let down_to = history
        .within(now, down_window)
        .max()
        .unwrap_or(recommended);
    if current < up_to {
        up_to
    } else if current > down_to {
        down_to
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{at, rate, spec};
    use super::super::{desired_replicas, reason};
    use super::*;

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
}
