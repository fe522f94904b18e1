//! The one HTTP error type: every handler returns it, it maps each case to a
//! status code and a JSON body `{"error": {"code", "message", ...}}`, and it
//! never shows database text to a client.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use eventplane_store::ErrorBody;
use eventplane_store::events::AppendError;
use eventplane_store::events::group_commit::SubmitError;
use eventplane_store::events::model::{InvalidInput, MALFORMED_JSON};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("{message}")]
    Unauthorized { message: String },
    #[error("{message}")]
    Forbidden { message: String },
    /// An append the store refused; the store names the problem.
    #[error("{0}")]
    Append(AppendError),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("request body is larger than the configured limit (--max-body-bytes)")]
    PayloadTooLarge,
    #[error("expected a body with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("{message}")]
    MethodNotAllowed { message: String },
    #[error("{message}")]
    UriTooLong { message: String },
    #[error("{message}")]
    HeadersTooLarge { message: String },
    #[error("{message}")]
    Timeout { code: &'static str, message: String },
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// The database no longer has a relation or column the read named: the
    /// projection changed (a swap, a removal) and this process has not
    /// loaded the change yet. The query service reloads and retries.
    #[error("the projection changed while it was read")]
    SchemaChanged(String),
    /// The read gave way to a change being applied: a replica cancelled it
    /// to replay WAL that conflicts with it (the replayed lock of a swap, a
    /// vacuum), or it waited past `lock_timeout` for a swap's lock. The
    /// query service reads again until its read timeout.
    #[error("the read gave way to a change being applied; try again")]
    ReadCancelled(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// `undefined_table`, `undefined_column`.
const SCHEMA_CHANGED: [&str; 2] = ["42P01", "42703"];

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::Unprocessable {
            code,
            message: message.into(),
        }
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::NotFound {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::Append(AppendError::Conflict { .. }) | Self::Conflict { .. } => {
                StatusCode::CONFLICT
            }
            Self::Append(AppendError::IdempotencyMismatch(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable { .. } | Self::SchemaChanged(_) | Self::ReadCancelled(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let code = match self {
            Self::Append(err) => return err.body().to_json(),
            Self::BadRequest { code, .. }
            | Self::Unprocessable { code, .. }
            | Self::NotFound { code, .. }
            | Self::Conflict { code, .. }
            | Self::Timeout { code, .. }
            | Self::Unavailable { code, .. } => *code,
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Forbidden { .. } => "forbidden",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::UriTooLong { .. } => "uri_too_long",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::SchemaChanged(_) => "projection_changing",
            Self::ReadCancelled(_) => "read_cancelled",
            Self::Internal(_) => "internal",
        };
        ErrorBody::new(code, self.to_string()).to_json()
    }
}

/// Seconds a client should wait before retrying a 503: the conditions
/// behind one (a saturated pool, a projection being swapped) clear within
/// about that.
const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(err) = &self {
            tracing::error!(error = ?err, "request failed");
        }
        let status = self.status();
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

impl ApiError {
    /// The error of a load shared by several requests (the L1 cache runs
    /// one load per key).
    pub fn from_shared(err: &sqlx::Error) -> Self {
        match Self::classify(err) {
            Some(known) => known,
            None => Self::Internal(anyhow::anyhow!("{err}")),
        }
    }

    fn classify(err: &sqlx::Error) -> Option<Self> {
        match err {
            // serialization_failure: on a hot standby, "canceling statement
            // due to conflict with recovery" (reads here never serialize);
            // lock_not_available: only reads wait with a `lock_timeout`.
            sqlx::Error::Database(db)
                if db.code().is_some_and(|c| c == "40001" || c == "55P03") =>
            {
                Some(Self::ReadCancelled(db.message().to_string()))
            }
            busy if eventplane_store::db::is_busy(busy) => Some(Self::Unavailable {
                code: "database_busy",
                message: "the database did not answer in time; try again shortly".into(),
            }),
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| SCHEMA_CHANGED.contains(&c.as_ref())) =>
            {
                Some(Self::SchemaChanged(db.message().to_string()))
            }
            _ => None,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match Self::classify(&err) {
            Some(known) => known,
            None => Self::Internal(err.into()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::unprocessable("invalid_body", e.body_text()),
            JsonRejection::JsonSyntaxError(e) => Self::bad_request("malformed_json", e.body_text()),
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::PayloadTooLarge
            }
            other => Self::bad_request("invalid_body", other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request("invalid_path", rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request("invalid_query", rejection.body_text())
    }
}

impl From<AppendError> for ApiError {
    fn from(err: AppendError) -> Self {
        Self::Append(err)
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::Overloaded => Self::Unavailable {
                code: "overloaded",
                message: err.to_string(),
            },
            SubmitError::Busy(_) => Self::Unavailable {
                code: "database_busy",
                message: err.to_string(),
            },
            SubmitError::Unstorable(_) => Self::Unprocessable {
                code: "unstorable_event",
                message: err.to_string(),
            },
            SubmitError::Database(_) => Self::Internal(err.into()),
        }
    }
}

impl From<InvalidInput> for ApiError {
    fn from(err: InvalidInput) -> Self {
        if err.code == MALFORMED_JSON {
            // JSON the parser let through as raw text, but that is not
            // text: a 400, as the parser's own refusals are.
            Self::BadRequest {
                code: err.code,
                message: err.message,
            }
        } else {
            Self::Unprocessable {
                code: err.code,
                message: err.message,
            }
        }
    }
}
