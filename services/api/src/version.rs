//! The life cycle of one projection version in the version registry, as
//! the projector, the rebuild and the operator all read it.

use std::fmt;
use std::str::FromStr;

/// Where one version of a projection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VersionState {
    /// Being loaded from the event log beside the active version.
    Building,
    /// Serving reads; at most one version of a projection is active.
    Active,
    /// Replaced by a swap and kept for swapping back until retention ends.
    Retained,
}

impl VersionState {
    /// The stored name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Building => "building",
            VersionState::Active => "active",
            VersionState::Retained => "retained",
        }
    }
}

impl fmt::Display for VersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored state this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown version state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for VersionState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            VersionState::Building,
            VersionState::Active,
            VersionState::Retained,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| UnknownState(s.to_string()))
    }
}

impl TryFrom<String> for VersionState {
    type Error = UnknownState;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_stored_names() {
        for state in [
            VersionState::Building,
            VersionState::Active,
            VersionState::Retained,
        ] {
            assert_eq!(state.as_str().parse::<VersionState>(), Ok(state));
        }
        assert_eq!(
            "swapping".parse::<VersionState>(),
            Err(UnknownState("swapping".into()))
        );
    }
}
