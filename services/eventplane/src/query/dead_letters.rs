//! Dead letters a client can act on: listing them (paged, in log order,
//! with the event and the reason), and replaying them once the spec is
//! fixed. A replay runs on the primary under the live checkpoint's lock
//! (see `eventplane_store::batch::replay_dead_letters`) and then orphans
//! the projection's cache entries.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use eventplane_store::batch::{TailEvent, replay_dead_letters};
use eventplane_store::checkpoints;
use serde_json::{Value, json};

use eventplane_store::error_body::ErrorResponse;

use super::QueryService;
use crate::api_error::{ApiError, ApiResult};
use crate::auth::{Access, Grants};

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;
/// Most dead letters one replay applies; a larger backlog takes several.
pub const MAX_REPLAY: i64 = 10_000;

fn number(params: &BTreeMap<String, String>, name: &str, default: i64, max: i64) -> ApiResult<i64> {
    match params.get(name) {
        None => Ok(default),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("{name} must be between 1 and {max}"),
                )
            }),
    }
}

/// Refuses any parameter not in `allowed`, naming it.
pub(super) fn only(params: &BTreeMap<String, String>, allowed: &[&str]) -> ApiResult<()> {
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::bad_request(
            "unknown_parameter",
            format!("unknown parameter {unknown:?}; this takes {allowed:?}"),
        )),
        None => Ok(()),
    }
}

/// A page of the projection's dead letters, in log order.
#[utoipa::path(
    get,
    path = "/v1/projections/{name}/dead-letters",
    tag = "queries",
    params(
        ("name" = String, Path),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("after" = Option<i64>, Query, description = "the `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "`{items: [{id, reason, deadAt, event}], next}`", body = Object),
        (status = 400, description = "bad parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant it", body = ErrorResponse),
        (status = 404, description = "no such projection", body = ErrorResponse),
    )
)]
pub async fn list(
    State(service): State<QueryService>,
    Extension(grants): Extension<Grants>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let Path(name) = path?;
    grants.require(Access::Read(&name))?;
    let Query(params) = params?;
    only(&params, &["after", "limit"])?;
    service.served(&name)?;
    let limit = number(&params, "limit", DEFAULT_PAGE, MAX_PAGE)?;
    let after = params
        .get("after")
        .map(|raw| {
            raw.parse::<i64>().map_err(|_| {
                ApiError::bad_request("invalid_cursor", "after must be the id of a dead letter")
            })
        })
        .transpose()?;
    let mut page = checkpoints::dead_letters(service.reads.pool(), &name, after, limit + 1).await?;
    let next = if page.len() as i64 > limit {
        page.truncate(limit as usize);
        page.last().map(|letter| letter.id)
    } else {
        None
    };
    let items: Vec<Value> = page
        .iter()
        .map(|letter| {
            json!({
                "id": letter.id,
                "reason": letter.reason,
                "deadAt": letter.dead_at,
                "event": TailEvent::from(letter).envelope(),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items, "next": next })).into_response())
}

/// Applies the dead letters with the projection's current spec, in log
/// order, exactly once; those that still fail stay.
#[utoipa::path(
    post,
    path = "/v1/projections/{name}/dead-letters/replay",
    tag = "queries",
    params(
        ("name" = String, Path),
        ("limit" = Option<i64>, Query, description = "at most this many, default and maximum 10000"),
    ),
    responses(
        (status = 200, description = "`{applied, stillDead, version}`", body = Object),
        (status = 400, description = "bad parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant it", body = ErrorResponse),
        (status = 404, description = "no such projection", body = ErrorResponse),
    )
)]
pub async fn replay(
    State(service): State<QueryService>,
    Extension(grants): Extension<Grants>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let Path(name) = path?;
    grants.require(Access::Replay(&name))?;
    let Query(params) = params?;
    only(&params, &["limit"])?;
    service.served(&name)?;
    let limit = number(&params, "limit", MAX_REPLAY, MAX_REPLAY)?;
    let replayed = replay_dead_letters(&service.primary, &name, limit).await?;
    if replayed.applied > 0
        && let Some(invalidator) = service.bus.invalidator(&name)
    {
        invalidator.invalidate_all().await;
    }
    Ok(Json(json!({
        "applied": replayed.applied,
        "stillDead": replayed.still_dead,
        "version": replayed.version,
    }))
    .into_response())
}
