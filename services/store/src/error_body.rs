//! The JSON error body clients see, `{"error": {"code", "message", ...}}`.
//! The HTTP edge answers with it, and the command queue stores it for a job
//! that failed, so a job's error reads exactly as the synchronous answer
//! would have.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable, machine-readable name of the problem (`snake_case`).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Fields particular to the problem (for example `actualVersion`).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub details: Map<String, Value>,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.into(),
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn with(mut self, field: &str, value: Value) -> Self {
        self.details.insert(field.to_string(), value);
        self
    }

    /// The whole body, wrapped in `{"error": …}` ([`ErrorResponse`]).
    pub fn to_json(&self) -> Value {
        json!({ "error": self })
    }
}

/// What every error answer carries: `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_sit_beside_the_code_and_message() {
        let body = ErrorBody::new("version_conflict", "expected 1, stream is at 2")
            .with("actualVersion", json!(2));
        assert_eq!(
            body.to_json(),
            json!({"error": {"code": "version_conflict", "message": "expected 1, stream is at 2", "actualVersion": 2}})
        );
    }
}
