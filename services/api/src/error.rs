//! The crate's error type for spec loading and validation.

use thiserror::Error;

/// Why a projection manifest or spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    /// The YAML could not be parsed into a manifest.
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// A field holds a value the runtime cannot accept; `field` is a path
    /// such as `spec.columns[2].name` so users can find it in their file.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl SpecError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field path, used when a file holds several documents.
    pub(crate) fn within(self, prefix: &str) -> Self {
        match self {
            SpecError::Invalid { field, message } => SpecError::Invalid {
                field: format!("{prefix}{field}"),
                message,
            },
            other => other,
        }
    }
}
