//! The operator's error type: failures of the Kubernetes API calls that a
//! reconcile could not complete. Problems with a resource's content or its
//! database are not errors here: they become status conditions.

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
