//! The query service: rows by key and declared list queries with keyset
//! pagination, served through L1 → L2 → L3 (Postgres, through the read
//! pool, which may point at a replica). Only declared queries run; there
//! are no free-form filters.
//!
//! What is served follows the catalog: each catalog change builds a new
//! map of served projections (the active version's columns and queries)
//! and swaps it in; a request works on the map it started with, so a
//! reload never drops one. A read the database refuses because a relation
//! or column is gone (a swap or removal not loaded yet) reloads the catalog
//! and runs once more.

pub mod cache;
pub mod consistency;
pub mod dead_letters;
pub mod replica;
pub mod slow;
pub mod subscriptions;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, OriginalUri, Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use eventplane_api::{QuerySpec, parse_param};
use eventplane_plan::{decode_cursor, encode_cursor, list_sql, row_sql};
use percent_encoding::percent_decode_str;
use serde_json::Value;
use sha2::{Digest, Sha256};
// Generated SQL holds only validated, quoted identifiers; values are bound.
use sqlx::{AssertSqlSafe, PgPool};
use tracing::{Instrument as _, Span, field};

use arc_swap::ArcSwap;
use eventplane_store::catalog::Snapshot;
use eventplane_store::{Projection, Token, db};

use eventplane_store::error_body::ErrorResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api_error::{ApiError, ApiResult};
use crate::auth::{Access, Grants};
use crate::catalog::Follower;
use crate::invalidation::Scope;
use crate::metrics::{Metrics, QueryType};
use crate::traces::Incoming;
use cache::{CacheBus, Cached, Layer, ProjectionCache, row_l1_key};
use replica::{Reads, ReplicaConfig};

/// The role name query processes register under.
pub const ROLE: &str = "query";

/// One served projection: the active version's runtime, its prepared SQL
/// and its cache.
pub struct Served {
    pub projection: Arc<Projection>,
    pub cache: Arc<ProjectionCache>,
    row_sql: Arc<str>,
    /// Per query: (SQL without cursor, SQL with cursor).
    list_sql: HashMap<String, (Arc<str>, Arc<str>)>,
}

impl Served {
    fn new(projection: Projection, cache: Arc<ProjectionCache>) -> Self {
        let spec = &projection.spec;
        let list_sql = spec
            .queries
            .iter()
            .map(|q| {
                let plain = list_sql(spec, q, &spec.table, false).sql;
                let paged = list_sql(spec, q, &spec.table, true).sql;
                (q.name.clone(), (plain.into(), paged.into()))
            })
            .collect();
        Served {
            row_sql: row_sql(spec, &spec.table).into(),
            list_sql,
            cache,
            projection: Arc::new(projection),
        }
    }
}

/// The projections served now, by name, and the catalog generation they
/// come from.
#[derive(Default)]
pub struct ServedSet {
    pub generation: i64,
    pub projections: HashMap<String, Arc<Served>>,
}

/// The query service as handlers and tasks hold it: one pointer, so the
/// copy every request takes costs one reference count.
#[derive(Clone)]
pub struct QueryService(Arc<QueryState>);

impl std::ops::Deref for QueryService {
    type Target = QueryState;

    fn deref(&self) -> &QueryState {
        &self.0
    }
}

pub struct QueryState {
    pub served: ArcSwap<ServedSet>,
    pub follower: Follower,
    l1_capacity_bytes: u64,
    /// Where reads go: the read pool, or the primary while it falls back.
    pub reads: Arc<Reads>,
    /// The primary, for the few writes the query API takes (dead-letter
    /// replays).
    pub primary: PgPool,
    pub bus: Arc<CacheBus>,
    pub metrics: Arc<Metrics>,
    pub consistency_timeout: Duration,
    /// A read that gave way to a change is not tried again once this much
    /// time has passed since it started.
    read_timeout: Duration,
    /// Reads at least this slow are counted and logged with their plan.
    pub slow_query: Duration,
    /// The invalidation subscription, if Redis is configured.
    pub subscription: Option<Arc<tokio::task::JoinHandle<()>>>,
    /// Catch-up subscriptions to the event log.
    pub subscriptions: Arc<subscriptions::Subscriptions>,
}

#[derive(Clone, Debug)]
pub struct QueryConfig {
    /// L1 capacity per projection, in bytes.
    pub l1_capacity_bytes: u64,
    /// Longest a read with a token waits for the projection.
    pub consistency_timeout: Duration,
    /// Reads at least this slow are counted and logged with their plan.
    pub slow_query: Duration,
    /// Postgres cancels a read that runs longer (503 to the client).
    pub read_timeout: Duration,
    /// What to do when the read database is a replica that is down or
    /// behind.
    pub replica: ReplicaConfig,
    pub subscriptions: subscriptions::SubscriptionConfig,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            l1_capacity_bytes: 64 << 20,
            consistency_timeout: Duration::from_secs(5),
            slow_query: Duration::from_millis(100),
            read_timeout: Duration::from_secs(5),
            replica: ReplicaConfig::default(),
            subscriptions: subscriptions::SubscriptionConfig::default(),
        }
    }
}

impl QueryService {
    /// Builds the service on the catalog `follower` has loaded and starts
    /// following it; with a Redis URL it also starts the invalidation
    /// subscription (L1 stays bypassed until it is live).
    pub fn new(
        follower: Follower,
        reads: Arc<Reads>,
        primary: PgPool,
        redis: Option<(crate::redis_conn::Redis, String)>,
        scope: Scope,
        metrics: Arc<Metrics>,
        config: QueryConfig,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (manager, url) = match redis {
            Some((m, url)) => (Some(m), Some(url)),
            None => (None, None),
        };
        let bus = CacheBus::new(scope, manager, metrics.clone());
        let subscription = url.map(|url| Arc::new(tokio::spawn(bus.clone().subscribe(url))));
        let (subscriptions, notifications) =
            subscriptions::Subscriptions::new(primary.clone(), config.subscriptions);
        let service = QueryService(Arc::new(QueryState {
            served: ArcSwap::from_pointee(ServedSet::default()),
            follower,
            l1_capacity_bytes: config.l1_capacity_bytes,
            reads,
            primary,
            bus,
            metrics,
            consistency_timeout: config.consistency_timeout,
            read_timeout: config.read_timeout,
            slow_query: config.slow_query,
            subscription,
            subscriptions,
        }));
        service.serve(&service.follower.current());
        // The returned task is the service's: it follows the catalog and
        // forwards event notifications to the subscriptions.
        let follow = tokio::spawn({
            let service = service.clone();
            async move {
                tokio::join!(service.follow(), notifications);
            }
        });
        (service, follow)
    }

    /// Serves every catalog change from now on.
    async fn follow(self) {
        let mut changes = self.follower.subscribe();
        while changes.changed().await.is_ok() {
            let snapshot = changes.borrow_and_update().clone();
            self.serve(&snapshot);
        }
    }

    /// Serves `snapshot` from now on, unless something newer is served
    /// already. A projection whose active version and spec did not change
    /// keeps its prepared statements and cache.
    fn serve(&self, snapshot: &Snapshot) {
        let before = self.served.load();
        if snapshot.generation <= before.generation {
            return;
        }
        let mut projections = HashMap::with_capacity(snapshot.entries.len());
        for entry in &snapshot.entries {
            let Some(active) = entry.active_projection() else {
                continue;
            };
            let served = match before.projections.get(&entry.name) {
                Some(old) if *old.projection == active => old.clone(),
                old => {
                    let cache =
                        self.bus
                            .cache(&entry.name, &active.spec.cache, self.l1_capacity_bytes);
                    if old.is_some() {
                        // Another version or spec: nothing cached for the
                        // old one may answer for it.
                        cache.l1.invalidate_all();
                    }
                    Arc::new(Served::new(active, cache))
                }
            };
            projections.insert(entry.name.clone(), served);
        }
        self.bus.retain(|name| projections.contains_key(name));
        self.served.store(Arc::new(ServedSet {
            generation: snapshot.generation,
            projections,
        }));
    }

    pub(crate) fn served(&self, name: &str) -> ApiResult<Arc<Served>> {
        self.served
            .load()
            .projections
            .get(name)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(
                    "projection_not_found",
                    format!("no projection named {name:?}"),
                )
            })
    }

    /// Runs `read` on projection `name` as served now, again when it
    /// failed in a way another try can fix: it gave way to a change being
    /// applied (a replica replaying WAL, a swap's lock; retried with backoff
    /// until the read timeout), the database says the projection changed
    /// under it (reload the catalog first, one more try), or the read
    /// database is out of reach and reads may fall back to the primary.
    async fn read<T, F, Fut>(&self, name: &str, read: F) -> ApiResult<T>
    where
        F: Fn(Arc<Served>) -> Fut,
        Fut: Future<Output = ApiResult<T>>,
    {
        let deadline = Instant::now() + self.read_timeout;
        let mut backoff = READ_RETRY_FIRST_BACKOFF;
        let mut answer = read(self.served(name)?).await;
        while let Err(ApiError::ReadCancelled(err)) = &answer {
            if Instant::now() + backoff >= deadline {
                break;
            }
            tracing::debug!(projection = %name, error = %err, "read gave way to a change being applied; reading again");
            self.metrics.replica_read_retries.inc();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(READ_RETRY_MAX_BACKOFF);
            answer = read(self.served(name)?).await;
        }
        match answer {
            Err(ApiError::Unavailable {
                code: "database_busy",
                ..
            }) if self.reads.failed() => read(self.served(name)?).await,
            Err(ApiError::SchemaChanged(err)) => {
                tracing::info!(projection = %name, error = %err, "projection changed under a read; reloading the catalog");
                let snapshot = self.follower.refresh().await?;
                self.serve(&snapshot);
                match read(self.served(name)?).await {
                    Err(ApiError::SchemaChanged(err)) => Err(ApiError::Unavailable {
                        code: "projection_changing",
                        message: format!(
                            "projection {name:?} is changing; try again shortly ({err})"
                        ),
                    }),
                    other => other,
                }
            }
            other => other,
        }
    }
}

/// The first pause before a read that gave way to a change is run again;
/// it doubles up to the cap. A replayed swap clears within milliseconds
/// once its commit is applied, so the first tries come soon.
const READ_RETRY_FIRST_BACKOFF: Duration = Duration::from_millis(5);
const READ_RETRY_MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The query API's routes with their OpenAPI description.
pub fn api() -> OpenApiRouter<QueryService> {
    OpenApiRouter::new()
        .routes(routes!(list_projections))
        .routes(routes!(projection_status))
        .routes(routes!(get_row))
        // A composite key takes one segment per key column; the route
        // above describes both.
        .route(
            "/v1/projections/{name}/rows/{key}/{*rest}",
            axum::routing::get(get_row),
        )
        .routes(routes!(run_query))
        .routes(routes!(dead_letters::list))
        .routes(routes!(dead_letters::replay))
        .routes(routes!(subscriptions::subscribe))
}

pub fn router(service: QueryService) -> Router {
    let (routes, _) = api().split_for_parts();
    routes.with_state(service)
}

/// The header that says which cache layer answered.
const CACHE_LAYER_HEADER: header::HeaderName = header::HeaderName::from_static("eventplane-cache");

fn json_response(body: &Cached, layer: Layer) -> Response {
    let mut response = match body.as_ref() {
        Some(json) => {
            let mut response = Response::new(axum::body::Body::from(json.clone()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        None => ApiError::not_found("row_not_found", "no row with that key").into_response(),
    };
    response
        .headers_mut()
        .insert(CACHE_LAYER_HEADER, HeaderValue::from_static(layer.as_str()));
    response
}

/// A query's span; `cache.layer` says which layer answered.
fn query_span(query_type: QueryType, projection: &str) -> Span {
    tracing::info_span!(
        "query.handle",
        otel.kind = "server",
        trace_id = field::Empty,
        "query.type" = query_type.as_str(),
        "eventplane.projection" = projection,
        "cache.layer" = field::Empty,
    )
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

/// One row by key, through L1, L2 and Postgres (the answer's
/// `Eventplane-Cache` header says which); with `token`, from Postgres once
/// the projection has the write.
#[utoipa::path(
    get,
    path = "/v1/projections/{name}/rows/{key}",
    tag = "queries",
    params(
        ("name" = String, Path),
        ("key" = String, Path, description = "the key column's value; for a composite key, one path segment per key column in key order (`rows/acme/o-1`), each percent-encoded (a `/` inside a value is `%2F`)"),
        ("token" = Option<String>, Query, description = "an append's token: read your write"),
    ),
    responses(
        (status = 200, description = "the row", body = Object),
        (status = 400, description = "bad path, header or parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant it", body = ErrorResponse),
        (status = 404, description = "no such projection or row", body = ErrorResponse),
        (status = 503, description = "busy or changing", body = ErrorResponse),
        (status = 504, description = "the token was not reached in time", body = ErrorResponse),
    )
)]
async fn get_row(
    State(service): State<QueryService>,
    Extension(grants): Extension<Grants>,
    incoming: Incoming,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Response> {
    let started = Instant::now();
    let (name, key) = row_target(uri.path())?;
    grants.require(Access::Read(&name))?;
    // Most reads carry no query string: nothing to parse then.
    let token = match uri.query() {
        None => None,
        Some(_) => {
            let Query(params) = Query::<BTreeMap<String, String>>::try_from_uri(&uri)?;
            if let Some(unknown) = params.keys().find(|k| k.as_str() != "token") {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown parameter {unknown:?}; rows take only `token`"),
                ));
            }
            parse_token(&params)?
        }
    };
    let (span, _) = incoming.span(|| query_span(QueryType::Row, &name));
    let (body, layer) = service
        .read(&name, |served| row(&service, served, &key, token))
        .instrument(span.clone())
        .await?;
    span.record("cache.layer", layer.as_str());
    service
        .metrics
        .observe_query(QueryType::Row, started.elapsed().as_secs_f64());
    Ok(json_response(&body, layer))
}

/// The projection name and key segments of a row route's path
/// (`/v1/projections/{name}/rows/{key}[/{key}...]`), each percent-decoded
/// on its own: the decoded path could not tell a `/` inside a value from
/// the one between two key columns. Nothing is copied unless it was
/// encoded.
fn row_target(raw_path: &str) -> ApiResult<(Cow<'_, str>, Vec<Cow<'_, str>>)> {
    fn decoded<'a>(segment: &'a str, code: &'static str, what: &str) -> ApiResult<Cow<'a, str>> {
        if !segment.contains('%') {
            // Nothing encoded: the segment is the text (and a `&str` is
            // valid UTF-8 already).
            return Ok(Cow::Borrowed(segment));
        }
        percent_decode_str(segment)
            .decode_utf8()
            .map_err(|_| ApiError::bad_request(code, format!("{what} {segment:?} is not UTF-8")))
    }
    let (name, keys) = raw_path
        .strip_prefix("/v1/projections/")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(name, rest)| Some((name, rest.strip_prefix("rows/")?)))
        .ok_or_else(|| ApiError::bad_request("invalid_path", "the path names no key"))?;
    let name = decoded(name, "invalid_path", "projection name")?;
    let keys = keys
        .split('/')
        .map(|segment| decoded(segment, "invalid_key", "key segment"))
        .collect::<ApiResult<_>>()?;
    Ok((name, keys))
}

async fn row(
    service: &QueryService,
    served: Arc<Served>,
    segments: &[Cow<'_, str>],
    token: Option<Token>,
) -> ApiResult<(Cached, Layer)> {
    let spec = &served.projection.spec;
    let key = eventplane_plan::key::from_params(spec, segments)
        .map_err(|e| ApiError::bad_request("invalid_key", format!("key: {e}")))?;
    // The pool is chosen when a read really goes to Postgres (a cache hit
    // reads nothing, and counts no fallback), once per request; the
    // statement's parameters are made only then too.
    let load = |pool: PgPool| {
        let service = service.clone();
        let sql = served.row_sql.clone();
        let parts = eventplane_plan::key::parts(spec, &key);
        async move {
            let started = Instant::now();
            let row: Option<String> = db::read_retrying(|| {
                let mut query = sqlx::query_scalar(AssertSqlSafe(sql.clone()));
                for part in &parts {
                    query = query.bind(part);
                }
                query.fetch_optional(&pool)
            })
            .await?;
            slow::check(
                &service,
                &pool,
                QueryType::Row,
                &sql,
                parts,
                started.elapsed(),
            );
            Ok::<Cached, sqlx::Error>(Arc::new(row.map(Bytes::from)))
        }
    };
    if let Some(token) = token {
        // On the heap, as the miss path in `cached` is.
        Box::pin(async {
            let pool = service.reads.pool().clone();
            consistency::wait_for(service, &pool, &served.projection, token).await?;
            Ok((load(pool).await?, Layer::L3))
        })
        .await
    } else {
        let version = served.projection.spec.version;
        let l2_key = |epoch| {
            service
                .bus
                .scope
                .row_key(&served.projection.name, version, epoch, &key)
        };
        let load = || load(service.reads.pool().clone());
        cached(service, &served, row_l1_key(version, &key), l2_key, load).await
    }
}

/// L1 → L2 → load, recording which layer answered. `l2_key` makes the L2
/// key for an epoch; it is only called when L1 does not answer, so a hit
/// costs one lookup and nothing else.
async fn cached<K, F, Fut>(
    service: &QueryService,
    served: &Served,
    l1_key: String,
    l2_key: K,
    load: F,
) -> ApiResult<(Cached, Layer)>
where
    K: FnOnce(u64) -> String,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Cached, sqlx::Error>>,
{
    let cache = &served.cache;
    let counts = &service.metrics.cache_counts;
    if !service.bus.usable(cache) {
        return Ok((load().await?, Layer::L3));
    }
    let l1_live = service.bus.l1_live();
    if l1_live && let Some(hit) = cache.l1.get(&l1_key).await {
        counts[0].record(true);
        return Ok((hit, Layer::L1));
    }
    // The miss path's state lives on the heap: inline, its size would make
    // every request's future (hits included) that much larger to create
    // and move.
    Box::pin(async move {
        let generation = cache.generation();
        let epoch = cache.epoch();
        let l2_key = l2_key(epoch);
        let through_l2 = async {
            if let Some(hit) = service.bus.l2_get(&l2_key).await {
                counts[1].record(true);
                return Ok::<_, sqlx::Error>((hit, Layer::L2));
            }
            counts[1].record(false);
            let value = load().await?;
            counts[2].record(true);
            // The fill is conditional on the generation in Redis (an
            // invalidation since `generation` was read makes it a no-op),
            // so it is as safe later as now: it is written after the
            // answer goes out, with other fills.
            service
                .bus
                .l2_fill(&served.cache, l2_key, epoch, generation, &value);
            Ok((value, Layer::L3))
        };
        if !l1_live {
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
            .map_err(|e: Arc<sqlx::Error>| ApiError::from_shared(&e))?;
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
    })
    .await
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

/// A page of a declared list query: every declared filter as a parameter
/// of its name, `limit`, `after` (the `next` of the previous page) and
/// `token`.
#[utoipa::path(
    get,
    path = "/v1/projections/{name}/queries/{query}",
    tag = "queries",
    params(
        ("name" = String, Path),
        ("query" = String, Path, description = "a query the projection declares"),
        ("limit" = Option<u32>, Query),
        ("after" = Option<String>, Query, description = "cursor"),
        ("token" = Option<String>, Query),
    ),
    responses(
        (status = 200, description = "`{items, next}`", body = Object),
        (status = 400, description = "bad path, header or parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant it", body = ErrorResponse),
        (status = 404, description = "no such projection or query", body = ErrorResponse),
        (status = 503, description = "busy or changing", body = ErrorResponse),
        (status = 504, description = "the token was not reached in time", body = ErrorResponse),
    )
)]
async fn run_query(
    State(service): State<QueryService>,
    Extension(grants): Extension<Grants>,
    incoming: Incoming,
    path: Result<Path<(String, String)>, PathRejection>,
    params: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let Path((name, query_name)) = path?;
    grants.require(Access::Read(&name))?;
    let Query(params) = params?;
    let (span, _) = incoming.span(|| query_span(QueryType::List, &name));
    let (body, layer) = service
        .read(&name, |served| list(&service, served, &query_name, &params))
        .instrument(span.clone())
        .await?;
    span.record("cache.layer", layer.as_str());
    service
        .metrics
        .observe_query(QueryType::List, started.elapsed().as_secs_f64());
    Ok(json_response(&body, layer))
}

async fn list(
    service: &QueryService,
    served: Arc<Served>,
    query_name: &str,
    params: &BTreeMap<String, String>,
) -> ApiResult<(Cached, Layer)> {
    let name = &served.projection.name;
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
    let list = list_params(&served, query, params)?;

    // As for rows: the pool is chosen when Postgres is really read.
    let load = {
        let service = service.clone();
        let (plain, paged) = served.list_sql[&query.name].clone();
        let filters = list.filters.clone();
        let cursor = list.cursor.clone();
        let limit = list.limit;
        move |pool: PgPool| async move {
            let sql = if cursor.is_some() { paged } else { plain };
            let started = Instant::now();
            let mut rows = db::read_retrying(|| {
                let mut q = sqlx::query_as::<_, (String, String)>(AssertSqlSafe(sql.clone()));
                for value in filters.iter().chain(cursor.iter().flatten()) {
                    q = q.bind(value);
                }
                q.bind(i64::from(limit) + 1).fetch_all(&pool)
            })
            .await?;
            let mut params: Vec<String> = filters
                .iter()
                .chain(cursor.iter().flatten())
                .cloned()
                .collect();
            params.push((i64::from(limit) + 1).to_string());
            slow::check(
                &service,
                &pool,
                QueryType::List,
                &sql,
                params,
                started.elapsed(),
            );
            let next = if rows.len() > limit as usize {
                rows.truncate(limit as usize);
                rows.last().map(|(_, sort)| encode_cursor(sort))
            } else {
                None
            };
            Ok::<Cached, sqlx::Error>(Arc::new(Some(Bytes::from(page_body(&rows, next)))))
        }
    };
    if let Some(token) = list.token {
        let pool = service.reads.pool().clone();
        consistency::wait_for(service, &pool, &served.projection, token).await?;
        Ok((load(pool).await?, Layer::L3))
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
        let version = spec.version;
        let l1_key = format!("l:{version}:{generation}:{}:{digest}", query.name);
        let l2_key = |epoch| {
            service
                .bus
                .scope
                .list_key(name, version, epoch, generation, &query.name, &digest)
        };
        let load = || load(service.reads.pool().clone());
        cached(service, &served, l1_key, l2_key, load).await
    }
}

/// `{"items": [...], "next": ...}` from the rows' JSON text as Postgres
/// rendered it: nothing is parsed and written again, so numbers keep every
/// digit.
fn page_body(rows: &[(String, String)], next: Option<String>) -> String {
    let mut body =
        String::with_capacity(rows.iter().map(|(row, _)| row.len() + 1).sum::<usize>() + 64);
    body.push_str(r#"{"items":["#);
    for (i, (row, _)) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(row);
    }
    body.push_str(r#"],"next":"#);
    match next {
        // Base64url: nothing in it needs escaping.
        Some(cursor) => {
            body.push('"');
            body.push_str(&cursor);
            body.push('"');
        }
        None => body.push_str("null"),
    }
    body.push('}');
    body
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The projections this token may read, and the catalog generation served.
#[utoipa::path(
    get,
    path = "/v1/projections",
    tag = "queries",
    responses(
        (status = 200, description = "`{projections, catalogGeneration}`", body = Object),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
    )
)]
async fn list_projections(
    State(service): State<QueryService>,
    Extension(grants): Extension<Grants>,
) -> Json<Value> {
    let served = service.served.load();
    let mut names: Vec<&String> = served
        .projections
        .keys()
        .filter(|name| grants.allows(Access::Read(name)))
        .collect();
    names.sort();
    Json(serde_json::json!({ "projections": names, "catalogGeneration": served.generation }))
}

/// A projection's status as one query process reports it: the store's
/// progress figures and the catalog generation this process serves.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ServedStatus {
    #[serde(flatten)]
    status: eventplane_store::status::ProjectionStatus,
    catalog_generation: i64,
    /// The read database's state, when reads go to a separate one.
    #[serde(skip_serializing_if = "Option::is_none")]
    read_replica: Option<replica::ReplicaState>,
}

/// A projection's checkpoint, lag, dead letters and halt reason, the
/// projector applying it, and the catalog generation this process serves.
#[utoipa::path(
    get,
    path = "/v1/projections/{name}/status",
    tag = "queries",
    params(("name" = String, Path)),
    responses(
        (status = 200, body = eventplane_store::status::ProjectionStatus),
        (status = 400, description = "bad path, header or parameter", body = ErrorResponse),
        (status = 401, description = "a bearer token is needed", body = ErrorResponse),
        (status = 403, description = "the token does not grant it", body = ErrorResponse),
        (status = 404, description = "no such projection", body = ErrorResponse),
    )
)]
async fn projection_status(
    State(service): State<QueryService>,
    Extension(grants): Extension<Grants>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let Path(name) = path?;
    grants.require(Access::Read(&name))?;
    let generation = service.served.load().generation;
    let served = service.served(&name)?;
    let status = eventplane_store::status::status(service.reads.pool(), &served.projection)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "projection_not_started",
                format!("projection {name:?} has no checkpoint yet"),
            )
        })?;
    Ok(Json(ServedStatus {
        status,
        catalog_generation: generation,
        read_replica: service.reads.state(),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn a_row_path_gives_the_name_and_each_key_segment_decoded_on_its_own() {
        let (name, keys) = row_target("/v1/projections/orders/rows/acme/o%2F1").unwrap();
        assert_eq!(name, "orders");
        assert_eq!(keys, ["acme", "o/1"]);
        // Nothing encoded: nothing copied.
        let (name, keys) = row_target("/v1/projections/ord%65rs/rows/o-1").unwrap();
        assert_eq!(name, "orders");
        assert!(matches!(&keys[0], Cow::Borrowed("o-1")));
    }

    #[test]
    fn a_row_path_that_does_not_decode_to_text_is_a_bad_request() {
        let err = row_target("/v1/projections/orders/rows/%FF").unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.body()["error"]["code"], "invalid_key");
        let err = row_target("/v1/projections/%FF/rows/1").unwrap_err();
        assert_eq!(err.body()["error"]["code"], "invalid_path");
    }
}
