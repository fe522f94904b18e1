//! The command service's HTTP API: appends (sync or async), stream reads and
//! job status.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sqlx::PgPool;
use tracing::{Instrument as _, Span, field};
use uuid::Uuid;

use eventplane_store::error_body::ErrorResponse;
use eventplane_store::events::AppendResult;
use eventplane_store::events::model::{AppendBody, validate_stream_id};
use eventplane_store::events::read::StreamPage;
use eventplane_store::events::read::read_stream;
use eventplane_store::events::{AppendRequest, Appender, GroupCommitConfig};
use eventplane_store::jobs::{self, JobView, Priority};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api_error::{ApiError, ApiResult};
use crate::auth::{Access, Grants};
use crate::metrics::{CommandType, Metrics};
use crate::traces::{Incoming, child};

/// How the command role runs.
#[derive(Clone, Debug)]
pub struct CommandConfig {
    /// Largest accepted request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    pub group_commit: GroupCommitConfig,
    /// Async command workers.
    pub job_workers: usize,
    /// Longest an append may take: its wait in the queue, and every
    /// statement of its transaction (Postgres cancels one past it). Past
    /// it the client gets 503 and nothing was written.
    pub append_timeout: std::time::Duration,
}

impl Default for CommandConfig {
    fn default() -> Self {
        CommandConfig {
            max_body_bytes: 1 << 20,
            group_commit: GroupCommitConfig::default(),
            job_workers: 2,
            append_timeout: std::time::Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
pub struct CommandState {
    pub pool: PgPool,
    pub appender: Appender,
    pub metrics: Arc<Metrics>,
}

/// The command API's routes with their OpenAPI description.
pub fn api() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(append))
        .routes(routes!(read))
        .routes(routes!(job))
}

pub fn router(state: CommandState, max_body_bytes: usize) -> Router {
    let (routes, _) = api().split_for_parts();
    routes
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> ApiResult<Option<&'a str>> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| {
                ApiError::bad_request("invalid_header", format!("{name} must be visible ASCII"))
            })
        })
        .transpose()
}

fn wants_async(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

/// Appends events to a stream, checking its version; with `Prefer:
/// respond-async` the request is stored as a job and answered 202.
#[utoipa::path(
    post,
    path = "/v1/streams/{stream}/events",
    tag = "commands",
    params(
        ("stream" = String, Path, description = "1-200 letters, digits and _ . : @ -"),
        ("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key answers the first result"),
        ("Prefer" = Option<String>, Header, description = "`respond-async` for a 202 and a job"),
        ("Eventplane-Priority" = Option<String>, Header, description = "high, normal or low (async only)"),
    ),
    request_body = AppendBody,
    responses(
        (status = 201, description = "appended", body = AppendResult),
        (status = 202, description = "stored as a job; poll the Location"),
        (status = 400, description = "bad path, header or parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant it", body = ErrorResponse),
        (status = 409, description = "version conflict", body = ErrorResponse),
        (status = 413, description = "body over the limit", body = ErrorResponse),
        (status = 415, description = "not application/json", body = ErrorResponse),
        (status = 422, description = "invalid events", body = ErrorResponse),
        (status = 503, description = "busy; retry after Retry-After", body = ErrorResponse),
    )
)]
async fn append(
    State(state): State<CommandState>,
    Extension(grants): Extension<Grants>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<AppendBody>, JsonRejection>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let Path(stream_id) = path?;
    validate_stream_id(&stream_id).map_err(|e| ApiError::bad_request(e.code, e.message))?;
    grants.require(Access::Append(&stream_id))?;
    let Json(body) = body?;
    let mode = if wants_async(&headers) {
        "append_async"
    } else {
        "append"
    };
    // The seed's APM span: the command's type (its first event's) and its
    // size in bytes.
    let (span, traceparent) = Incoming::from_headers(&headers).span(|| {
        tracing::info_span!(
            "command.handle",
            otel.kind = "server",
            otel.status_code = field::Empty,
            trace_id = field::Empty,
            "command.type" = body.events.first().map_or("", |e| e.event_type.as_str()),
            "command.size" = content_length(&headers),
            "command.events" = body.events.len() as i64,
            "command.mode" = mode,
            "eventplane.stream" = %stream_id,
        )
    });
    let request = AppendRequest {
        stream_id,
        expected_version: body.expected_version,
        events: body.events,
        idempotency_key: header_str(&headers, "idempotency-key")?.map(str::to_string),
        traceparent,
    };
    let answer = handle(&state, request, &headers, started)
        .instrument(span.clone())
        .await;
    if matches!(&answer, Err(err) if err.status().is_server_error()) {
        span.record("otel.status_code", "ERROR");
    }
    answer
}

/// The body of an append, inside its span.
async fn handle(
    state: &CommandState,
    request: AppendRequest,
    headers: &HeaderMap,
    started: Instant,
) -> ApiResult<Response> {
    request.validate()?;

    if wants_async(headers) {
        let priority = match header_str(headers, "eventplane-priority")? {
            None => Priority::Normal,
            Some(p) => Priority::parse(p).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_priority",
                    format!("Eventplane-Priority must be high, normal or low, got {p:?}"),
                )
            })?,
        };
        let id = jobs::enqueue(&state.pool, &request, priority).await?;
        state
            .metrics
            .observe_command(CommandType::AppendAsync, started.elapsed().as_secs_f64());
        let location = HeaderValue::from_str(&format!("/v1/jobs/{id}"))
            .expect("a uuid path is a valid header");
        return Ok((
            StatusCode::ACCEPTED,
            [
                (header::LOCATION, location),
                (
                    header::HeaderName::from_static("preference-applied"),
                    HeaderValue::from_static("respond-async"),
                ),
            ],
            Json(serde_json::json!({ "jobId": id, "status": "pending" })),
        )
            .into_response());
    }

    let outcome = state
        .appender
        .append(request)
        .instrument(child(&Span::current(), || {
            tracing::info_span!("command.append")
        }))
        .await?;
    state
        .metrics
        .observe_command(CommandType::Append, started.elapsed().as_secs_f64());
    let result = outcome?;
    Ok((StatusCode::CREATED, Json(result)).into_response())
}

/// The request body's size as its `Content-Length` says (0 when chunked);
/// signed, as OpenTelemetry integers are.
fn content_length(headers: &HeaderMap) -> i64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    from: Option<i64>,
    limit: Option<i64>,
}

/// Most events one stream page returns.
const MAX_STREAM_PAGE: i64 = 1000;

/// A page of a stream's events, by version.
#[utoipa::path(
    get,
    path = "/v1/streams/{stream}",
    tag = "commands",
    params(
        ("stream" = String, Path),
        ("from" = Option<i64>, Query, description = "first version, default 1"),
        ("limit" = Option<i64>, Query, description = "1-1000, default 100"),
    ),
    responses(
        (status = 200, body = StreamPage),
        (status = 400, description = "bad path, header or parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant it", body = ErrorResponse),
        (status = 404, description = "no such stream", body = ErrorResponse),
    )
)]
async fn read(
    State(state): State<CommandState>,
    Extension(grants): Extension<Grants>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let Path(stream_id) = path?;
    validate_stream_id(&stream_id).map_err(|e| ApiError::bad_request(e.code, e.message))?;
    grants.require(Access::ReadStream(&stream_id))?;
    let Query(params) = params?;
    let from = params.from.unwrap_or(1);
    let limit = params.limit.unwrap_or(100);
    if from < 1 {
        return Err(ApiError::bad_request("invalid_from", "from must be >= 1"));
    }
    if !(1..=MAX_STREAM_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_STREAM_PAGE}"),
        ));
    }
    let page = read_stream(&state.pool, &stream_id, from, limit)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "stream_not_found",
                format!("stream {stream_id:?} has no events"),
            )
        })?;
    state
        .metrics
        .observe_command(CommandType::ReadStream, started.elapsed().as_secs_f64());
    Ok(Json(page).into_response())
}

/// An async command's state and result.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "commands",
    params(("id" = String, Path, description = "the job id of a 202 answer")),
    responses(
        (status = 200, body = JobView),
        (status = 400, description = "bad path, header or parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant it", body = ErrorResponse),
        (status = 404, description = "no such job", body = ErrorResponse),
    )
)]
async fn job(
    State(state): State<CommandState>,
    Extension(grants): Extension<Grants>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    grants.require(Access::Jobs)?;
    let Path(id) = path?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request("invalid_job_id", format!("{id:?} is not a job id")))?;
    let view = jobs::get(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job_not_found", format!("no job {id}")))?;
    Ok(Json(view).into_response())
}
