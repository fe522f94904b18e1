//! The query service: rows by key and declared list queries with keyset
//! pagination, served through L1 → L2 → L3 (Postgres, through the read
//! pool, which may point at a replica). Only declared queries run; there
//! are no free-form filters.

pub mod cache;
pub mod consistency;
pub mod slow;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use eventplane_api::{QuerySpec, parse_param};
use eventplane_plan::{decode_cursor, encode_cursor, list_sql, row_sql};
use serde_json::Value;
use sha2::{Digest, Sha256};
// Generated SQL holds only validated, quoted identifiers; values are bound.
use sqlx::{AssertSqlSafe, PgPool};

use crate::api_error::{ApiError, ApiResult};
use crate::invalidation;
use crate::metrics::Metrics;
use cache::{CacheBus, Cached, Layer, ProjectionCache, row_l1_key};
use eventplane_store::Projection;
use eventplane_store::Token;

/// One served projection: its spec, its prepared SQL and its cache.
pub struct Served {
    pub projection: Arc<Projection>,
    pub cache: Arc<ProjectionCache>,
    row_sql: Arc<str>,
    /// Per query: (SQL without cursor, SQL with cursor).
    list_sql: HashMap<String, (Arc<str>, Arc<str>)>,
}

#[derive(Clone)]
pub struct QueryService {
    pub served: Arc<HashMap<String, Served>>,
    pub read_pool: PgPool,
    pub bus: Arc<CacheBus>,
    pub metrics: Arc<Metrics>,
    pub consistency_timeout: Duration,
    /// Reads at least this slow are counted and logged with their plan.
    pub slow_query: Duration,
    /// The invalidation subscription, if Redis is configured.
    pub subscription: Option<Arc<tokio::task::JoinHandle<()>>>,
}

#[derive(Clone, Debug)]
pub struct QueryConfig {
    /// L1 capacity per projection, in bytes.
    pub l1_capacity_bytes: u64,
    /// Longest a read with a token waits for the projection.
    pub consistency_timeout: Duration,
    /// Reads at least this slow are counted and logged with their plan.
    pub slow_query: Duration,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            l1_capacity_bytes: 64 << 20,
            consistency_timeout: Duration::from_secs(5),
            slow_query: Duration::from_millis(100),
        }
    }
}

impl QueryService {
    /// Builds the service; with a Redis URL it also starts the invalidation
    /// subscription (L1 stays bypassed until it is live).
    pub fn new(
        projections: &[Arc<Projection>],
        read_pool: PgPool,
        redis: Option<(redis::aio::ConnectionManager, String)>,
        metrics: Arc<Metrics>,
        config: QueryConfig,
    ) -> Self {
        let mut served = HashMap::new();
        let mut caches = HashMap::new();
        for projection in projections {
            let cache = Arc::new(ProjectionCache::new(
                &projection.name,
                &projection.spec.cache,
                config.l1_capacity_bytes,
            ));
            caches.insert(projection.name.clone(), cache.clone());
            let list_sql = projection
                .spec
                .queries
                .iter()
                .map(|q| {
                    let plain = list_sql(&projection.spec, q, &projection.spec.table, false).sql;
                    let paged = list_sql(&projection.spec, q, &projection.spec.table, true).sql;
                    (q.name.clone(), (plain.into(), paged.into()))
                })
                .collect();
            served.insert(
                projection.name.clone(),
                Served {
                    projection: projection.clone(),
                    cache,
                    row_sql: row_sql(&projection.spec, &projection.spec.table).into(),
                    list_sql,
                },
            );
        }
        let (manager, url) = match redis {
            Some((m, url)) => (Some(m), Some(url)),
            None => (None, None),
        };
        let bus = CacheBus::new(caches, manager, metrics.clone());
        let subscription = url.map(|url| Arc::new(tokio::spawn(bus.clone().subscribe(url))));
        QueryService {
            served: Arc::new(served),
            read_pool,
            bus,
            metrics,
            consistency_timeout: config.consistency_timeout,
            slow_query: config.slow_query,
            subscription,
        }
    }

    fn served(&self, name: &str) -> ApiResult<&Served> {
        self.served.get(name).ok_or_else(|| {
            ApiError::not_found(
                "projection_not_found",
                format!("no projection named {name:?}"),
            )
        })
    }
}

pub fn router(service: QueryService) -> Router {
    Router::new()
        .route("/v1/projections", get(list_projections))
        .route("/v1/projections/{name}/status", get(projection_status))
        .route("/v1/projections/{name}/rows/{key}", get(get_row))
        .route("/v1/projections/{name}/queries/{query}", get(run_query))
        .with_state(service)
}

fn json_response(body: &Cached, layer: Layer) -> Response {
    let mut response = match body.as_ref() {
        Some(json) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json.clone(),
        )
            .into_response(),
        None => ApiError::not_found("row_not_found", "no row with that key").into_response(),
    };
    response
        .headers_mut()
        .insert("eventplane-cache", HeaderValue::from_static(layer.as_str()));
    response
}

fn parse_token(params: &BTreeMap<String, String>) -> ApiResult<Option<Token>> {
    params
        .get("token")
        .map(|t| {
            t.parse::<Token>()
                .map_err(|e| ApiError::bad_request("invalid_token", e))
        })
        .transpose()
}

async fn get_row(
    State(service): State<QueryService>,
    path: Result<Path<(String, String)>, PathRejection>,
    params: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let Path((name, key)) = path?;
    let Query(params) = params?;
    if let Some(unknown) = params.keys().find(|k| k.as_str() != "token") {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            format!("unknown parameter {unknown:?}; rows take only `token`"),
        ));
    }
    let served = service.served(&name)?;
    let spec = &served.projection.spec;
    let key = parse_param(spec.key_column().ty, &key)
        .map_err(|e| ApiError::bad_request("invalid_key", format!("key: {e}")))?;
    let token = parse_token(&params)?;

    let load = {
        let service = service.clone();
        let sql = served.row_sql.clone();
        let key = key.clone();
        move || async move {
            let started = Instant::now();
            let row: Option<Value> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
                .bind(&key)
                .fetch_optional(&service.read_pool)
                .await?;
            slow::check(&service, "row", &sql, vec![key], started.elapsed());
            Ok::<Cached, sqlx::Error>(Arc::new(row.map(|v| v.to_string())))
        }
    };
    let (body, layer) = if let Some(token) = token {
        consistency::wait_for(&service, &served.projection.name, token).await?;
        (load().await?, Layer::L3)
    } else {
        let l2_key = invalidation::row_key(&name, served.cache.epoch(), &key);
        cached(&service, served, row_l1_key(&key), l2_key, load).await?
    };
    service
        .metrics
        .observe_query("row", started.elapsed().as_secs_f64());
    Ok(json_response(&body, layer))
}

/// L1 → L2 → load, recording which layer answered.
async fn cached<F, Fut>(
    service: &QueryService,
    served: &Served,
    l1_key: String,
    l2_key: String,
    load: F,
) -> ApiResult<(Cached, Layer)>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Cached, sqlx::Error>>,
{
    let cache = &served.cache;
    let counts = &service.metrics.cache_counts;
    if !cache.enabled {
        return Ok((load().await?, Layer::L3));
    }
    let generation = cache.generation();
    let through_l2 = async {
        if let Some(hit) = service.bus.l2_get(&l2_key).await {
            counts[1].record(true);
            return Ok::<_, sqlx::Error>((hit, Layer::L2));
        }
        counts[1].record(false);
        let value = load().await?;
        counts[2].record(true);
        service
            .bus
            .l2_fill(cache, &l2_key, generation, &value)
            .await;
        Ok((value, Layer::L3))
    };
    if !service.bus.l1_live() {
        return Ok(through_l2.await?);
    }
    let loaded_here = AtomicBool::new(false);
    let layer_here = std::sync::Mutex::new(Layer::L1);
    let value = cache
        .l1
        .try_get_with(l1_key.clone(), async {
            loaded_here.store(true, Ordering::Relaxed);
            let (value, layer) = through_l2.await?;
            *layer_here.lock().expect("not poisoned") = layer;
            Ok::<_, sqlx::Error>(value)
        })
        .await
        .map_err(|e: Arc<sqlx::Error>| ApiError::Internal(anyhow::anyhow!("{e}")))?;
    // An invalidation arrived while loading: the value may predate it.
    if cache.generation() != generation {
        cache.l1.invalidate(&l1_key).await;
    }
    let hit = !loaded_here.load(Ordering::Relaxed);
    counts[0].record(hit);
    let layer = if hit {
        Layer::L1
    } else {
        *layer_here.lock().expect("not poisoned")
    };
    Ok((value, layer))
}

/// Parameters of one list query, validated against its declaration.
struct ListParams {
    filters: Vec<String>,
    cursor: Option<Vec<String>>,
    limit: u32,
    token: Option<Token>,
}

fn list_params(
    served: &Served,
    query: &QuerySpec,
    params: &BTreeMap<String, String>,
) -> ApiResult<ListParams> {
    let spec = &served.projection.spec;
    for name in params.keys() {
        let known = matches!(name.as_str(), "limit" | "after" | "token")
            || query.filters.iter().any(|f| f == name);
        if !known {
            return Err(ApiError::bad_request(
                "unknown_parameter",
                format!(
                    "unknown parameter {name:?}; query {:?} filters on {:?}",
                    query.name, query.filters
                ),
            ));
        }
    }
    let mut filters = Vec::with_capacity(query.filters.len());
    for column in &query.filters {
        let raw = params.get(column).ok_or_else(|| {
            ApiError::bad_request(
                "missing_filter",
                format!("query {:?} needs the filter {column:?}", query.name),
            )
        })?;
        let ty = spec
            .column(column)
            .expect("validated spec declares its filter columns")
            .ty;
        filters.push(
            parse_param(ty, raw)
                .map_err(|e| ApiError::bad_request("invalid_filter", format!("{column}: {e}")))?,
        );
    }
    let limit = match params.get("limit") {
        None => query.default_limit,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=query.max_limit).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be between 1 and {}", query.max_limit),
                )
            })?,
    };
    let cursor = params
        .get("after")
        .map(|c| {
            decode_cursor(spec, query, c).map_err(|e| ApiError::bad_request("invalid_cursor", e))
        })
        .transpose()?;
    Ok(ListParams {
        filters,
        cursor,
        limit,
        token: parse_token(params)?,
    })
}

async fn run_query(
    State(service): State<QueryService>,
    path: Result<Path<(String, String)>, PathRejection>,
    params: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let Path((name, query_name)) = path?;
    let Query(params) = params?;
    let served = service.served(&name)?;
    let spec = &served.projection.spec;
    let query = spec
        .queries
        .iter()
        .find(|q| q.name == query_name)
        .ok_or_else(|| {
            ApiError::not_found(
                "query_not_found",
                format!("projection {name:?} declares no query {query_name:?}"),
            )
        })?;
    let list = list_params(served, query, &params)?;

    let load = {
        let service = service.clone();
        let (plain, paged) = served.list_sql[&query.name].clone();
        let spec = spec.clone();
        let query = query.clone();
        let filters = list.filters.clone();
        let cursor = list.cursor.clone();
        let limit = list.limit;
        move || async move {
            let sql = if cursor.is_some() { paged } else { plain };
            let started = Instant::now();
            let mut q = sqlx::query_scalar::<_, Value>(AssertSqlSafe(sql.clone()));
            for value in filters.iter().chain(cursor.iter().flatten()) {
                q = q.bind(value);
            }
            let mut rows = q
                .bind(i64::from(limit) + 1)
                .fetch_all(&service.read_pool)
                .await?;
            let mut params: Vec<String> = filters
                .iter()
                .chain(cursor.iter().flatten())
                .cloned()
                .collect();
            params.push((i64::from(limit) + 1).to_string());
            slow::check(&service, "list", &sql, params, started.elapsed());
            let next = if rows.len() > limit as usize {
                rows.truncate(limit as usize);
                rows.last().map(|last| encode_cursor(&spec, &query, last))
            } else {
                None
            };
            let body = serde_json::json!({ "items": rows, "next": next });
            Ok::<Cached, sqlx::Error>(Arc::new(Some(body.to_string())))
        }
    };
    let (body, layer) = if let Some(token) = list.token {
        consistency::wait_for(&service, &served.projection.name, token).await?;
        (load().await?, Layer::L3)
    } else {
        let canonical: Vec<&str> = list
            .filters
            .iter()
            .chain(list.cursor.iter().flatten())
            .map(String::as_str)
            .collect();
        let canonical = serde_json::json!([canonical, list.limit]).to_string();
        let digest = hex(&Sha256::digest(canonical.as_bytes())[..12]);
        let generation = served.cache.generation();
        let l1_key = format!("l:{generation}:{}:{digest}", query.name);
        let l2_key = invalidation::list_key(
            &name,
            served.cache.epoch(),
            generation,
            &query.name,
            &digest,
        );
        cached(&service, served, l1_key, l2_key, load).await?
    };
    service
        .metrics
        .observe_query("list", started.elapsed().as_secs_f64());
    Ok(json_response(&body, layer))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn list_projections(State(service): State<QueryService>) -> Json<Value> {
    let mut names: Vec<&String> = service.served.keys().collect();
    names.sort();
    Json(serde_json::json!({ "projections": names }))
}

async fn projection_status(
    State(service): State<QueryService>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let Path(name) = path?;
    let served = service.served(&name)?;
    let status = eventplane_store::status::status(&service.read_pool, &served.projection)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "projection_not_started",
                format!("projection {name:?} has no checkpoint yet"),
            )
        })?;
    Ok(Json(status).into_response())
}
