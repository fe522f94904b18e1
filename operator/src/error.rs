//! The operator's error type: failures of the Kubernetes API calls that a
//! reconcile could not complete. Problems with a resource's content or its
//! database are not errors here: they become status conditions, carried
//! beside API failures by [`Blocked`].

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    #[error("{kind} {name} has no namespace")]
    MissingNamespace { kind: &'static str, name: String },
    #[error("serializing status: {0}")]
    Serialize(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed reconcile is retried this soon: most API failures are brief,
/// and a longer wait would leave the resource's status stale for minutes.
pub const RETRY_AFTER_ERROR: std::time::Duration = std::time::Duration::from_secs(15);

/// Why a step of a reconcile stopped short: for a reason the reconcile
/// reports (a condition, an Event, a deletion that waits), or because a
/// Kubernetes API call failed, which fails the reconcile.
#[derive(Debug)]
pub enum Blocked<Why> {
    By(Why),
    Kube(kube::Error),
}

impl<Why> From<kube::Error> for Blocked<Why> {
    fn from(err: kube::Error) -> Self {
        Blocked::Kube(err)
    }
}

impl<Why> Blocked<Why> {
    /// The same stop, with the reason told another way.
    pub fn map<Other>(self, f: impl FnOnce(Why) -> Other) -> Blocked<Other> {
        match self {
            Blocked::By(why) => Blocked::By(f(why)),
            Blocked::Kube(err) => Blocked::Kube(err),
        }
    }
}
