//! The domain's HTTP surface: REST API v1 and the node WebSocket (`session`).
//!
//! Every error is an [`ApiError`]: an HTTP status and a stable machine-readable `code`;
//! internal errors are logged and never echoed to clients.

mod contrib;
mod dashboard;
pub(crate) use dashboard::Snapshots;
pub(crate) mod relay;
pub(crate) mod session;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};
use stardust_proto::content::ContentId;
use stardust_proto::identity::NodeId;
use stardust_proto::job::JobSpec;
use stardust_proto::request;
use stardust_scheduler::matching::{self, Need, NodeView};

use crate::service::{Shared, now_ms};
use crate::store::{CreateJobError, JobRow, NewJob, StoreError};
use stardust_ledger::Account;
use stardust_scheduler::pricing::{self, Market};

/// An error answer: status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// An internal failure: logged, and told as such.
    fn internal(what: String) -> Self {
        tracing::error!(error = %what, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the domain's log",
        )
    }

    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the domain's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, axum::Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_request_bytes;
    Router::new()
        .route("/", get(dashboard::index))
        .route("/dashboard.js", get(dashboard::script))
        .route("/widget/{node}", get(dashboard::widget))
        .route("/metrics", get(dashboard::metrics))
        .route("/v1/dashboard", get(dashboard::dashboard))
        .route("/v1/events", get(dashboard::events))
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/jobs", post(submit))
        .route("/v1/quote", post(quote))
        .route("/v1/account", get(account))
        .route("/v1/ledger", get(ledger_summary))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/tasks", get(list_tasks))
        .route("/v1/jobs/{id}/results", get(results))
        .route("/v1/jobs/{id}/why", get(why))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/connect", get(session::connect))
        .route("/v1/relay", get(relay::connect))
        .merge(browser_routes())
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            dashboard::count_requests,
        ))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            limit_address,
        ))
        .with_state(shared)
}

/// The routes a browser node calls from its embedding page's origin (see [`contrib`]).
fn browser_routes() -> Router<Arc<Shared>> {
    let preflight = contrib::preflight;
    Router::new()
        .route("/contrib.js", get(contrib::script).options(preflight))
        .route(
            "/contrib/noble-ed25519.js",
            get(contrib::noble).options(preflight),
        )
        .route(
            "/v1/blobs/{id}",
            put(put_blob).get(get_blob).options(preflight),
        )
        .route(
            "/v1/nodes/{id}",
            get(dashboard::node_stats).options(preflight),
        )
        .route_layer(axum::middleware::from_fn(contrib::any_origin))
}

/// Refuses requests beyond the per-address rate, before any other work.
async fn limit_address(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<std::net::SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !shared.per_addr.allow(&addr.ip()) {
        shared.rejections.count("rate_limited_address");
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests from this address; slow down",
        )
        .into_response();
    }
    next.run(request).await
}

/// The body's content id (BLAKE3), hashed on a blocking thread when it is large
/// ([`crate::service::off_worker`]).
async fn body_id(body: &Bytes) -> ApiResult<ContentId> {
    if body.len() <= crate::service::HASH_INLINE_BYTES {
        return Ok(ContentId::of(body));
    }
    let body = body.clone();
    crate::service::off_worker(move || ContentId::of(&body))
        .await
        .map_err(|e| ApiError::internal(format!("hashing the body: {e}")))
}

/// Checks a signed request and refuses replays; returns the client's key.
async fn authenticate(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<NodeId> {
    let id = body_id(body).await?;
    authenticate_hashed(shared, method, uri, headers, id).await
}

/// [`authenticate`] with the body's content id.
async fn authenticate_hashed(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: ContentId,
) -> ApiResult<NodeId> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let now = now_ms();
    let key = request::verify_hashed(
        h(request::KEY_HEADER),
        h(request::TIME_HEADER),
        h(request::SIGNATURE_HEADER),
        method.as_str(),
        path,
        body.as_bytes(),
        now,
        Some(&shared.clients),
    )
    .map_err(|e| {
        shared.rejections.count("bad_request_signature");
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    })?;
    if !shared.per_key.allow(&key) {
        shared.rejections.count("rate_limited_key");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests from this key; slow down",
        ));
    }
    // Only non-idempotent requests (POST) are refused when replayed: identical GETs or PUTs
    // signed in the same millisecond are legitimate (and harmless when replayed).
    let sig = h(request::SIGNATURE_HEADER).unwrap_or_default();
    if method == Method::POST && !shared.replay.lock().await.fresh(sig, now) {
        shared.rejections.count("replayed_request");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "replay",
            "this signed request was already used",
        ));
    }
    Ok(key)
}

async fn health(State(shared): State<Arc<Shared>>) -> axum::Json<Value> {
    axum::Json(json!({
        "status": "ok",
        "domain": shared.identity.id(),
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": stardust_proto::PROTOCOL_VERSION,
        "rejected": shared.rejections.snapshot(),
    }))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

fn parse_id(s: &str) -> ApiResult<ContentId> {
    s.parse()
        .map_err(|e: stardust_proto::content::ParseContentIdError| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_content_id", e.to_string())
        })
}

async fn put_blob(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let hashed = body_id(&body).await?;
    authenticate_hashed(&shared, &method, &uri, &headers, hashed).await?;
    let id = parse_id(&id)?;
    if hashed != id {
        shared.rejections.count("blob_hash_mismatch");
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hash_mismatch",
            format!("the bytes hash to {hashed}, not {id}"),
        ));
    }
    let created = shared.store.put_blob(id, &body, now_ms()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(json!({ "id": id, "size": body.len() }))).into_response())
}

async fn get_blob(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    authenticate(&shared, &method, &uri, &headers, &Bytes::new()).await?;
    let id = parse_id(&id)?;
    let bytes = shared
        .store
        .blob(id)
        .await?
        .ok_or_else(|| ApiError::not_found("blob"))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `POST /v1/jobs` options.
#[derive(Debug, Deserialize)]
struct SubmitQuery {
    /// Answer once the job has ended (with its results, for a small job), or after this
    /// many milliseconds: submission and a long poll in one request.
    #[serde(default)]
    wait_ms: u64,
}

/// Results a submission that waited answers with at most; a larger job's are paged
/// (`GET /v1/jobs/{id}/results`).
const SUBMIT_RESULTS: u64 = 64;

async fn submit(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<SubmitQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let owner = authenticate(&shared, &method, &uri, &headers, &body).await?;
    check_wait(query.wait_ms)?;
    let (spec, trials) = parse_job(&body)?;
    // Before the job exists: a wait refused refuses the submission, and an end is told to
    // a subscriber that exists before the job does.
    let _held = if query.wait_ms > 0 {
        Some(shared.waiters.enter(owner)?)
    } else {
        None
    };
    let ends = shared.store.ended_jobs();
    let q = price(&shared, &spec, trials.len() as u64).await?;
    if let Some(limit) = spec.price_limit
        && q.price_per_scu > limit
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "over_price_limit",
            format!(
                "the price now is {} µcredits per SCU, above the job's price_limit of {limit}; retry later or raise the limit",
                q.price_per_scu
            ),
        ));
    }
    let now = now_ms();
    let mut inputs: Vec<ContentId> = trials.iter().map(|t| t.input).collect();
    inputs.sort_unstable();
    inputs.dedup();
    let (missing, module) = shared.store.submission_refs(&inputs, spec.module).await?;
    if let Some(input) = missing.first() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_blob",
            format!("input {input} is not uploaded (PUT /v1/blobs/{input})"),
        ));
    }
    let (metered, author) = match module {
        Some(found) => found,
        None => {
            let wasm = shared.store.blob(spec.module).await?.ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "missing_blob",
                    format!(
                        "module {} is not uploaded (PUT /v1/blobs/{})",
                        spec.module, spec.module
                    ),
                )
            })?;
            // Parsing and rewriting a module takes milliseconds: off the worker.
            let (metered_bytes, metered) = crate::service::off_worker(move || {
                let bytes = stardust_meter::instrument(&wasm)?;
                let id = ContentId::of(&bytes);
                Ok::<_, stardust_meter::MeterError>((bytes, id))
            })
            .await
            .map_err(|e| ApiError::internal(format!("metering the module: {e}")))?
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_module",
                    e.to_string(),
                )
            })?;
            shared.store.put_blob(metered, &metered_bytes, now).await?;
            shared
                .store
                .put_module(spec.module, metered, owner, now)
                .await?;
            (metered, owner)
        }
    };
    let new = NewJob {
        owner,
        spec: &spec,
        metered,
        author,
        trials: &trials,
        price: q.price_per_scu,
    };
    let job = match crate::dispatch::create_job(&shared, new, now).await {
        Ok(job) => job,
        Err(CreateJobError::Insufficient { needed, balance }) => {
            return Err(ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_credits",
                format!(
                    "the job may cost up to {} credits ({} tasks × {} replicas at their fuel limit, {} µcredits per SCU), held in escrow at submission; your balance is {} credits. An operator can grant credits: stardust ledger grant {owner} AMOUNT",
                    credits(needed.into()),
                    trials.len(),
                    spec.redundancy,
                    q.price_per_scu,
                    credits(balance)
                ),
            ));
        }
        Err(CreateJobError::Store(e)) => return Err(e.into()),
    };
    tracing::info!(job, tasks = trials.len(), owner = %owner.short(), "job submitted");
    let mut answer = json!({
        "job_id": job,
        "tasks": trials.len(),
        "module": metered,
        "price_per_scu": q.price_per_scu,
        "escrow": q.max_cost,
    });
    if query.wait_ms > 0 {
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_millis(query.wait_ms);
        // Not read now: the job was created after `ends` subscribed, so its end is told.
        let (row, tasks) = match wait_until_ended(&shared, job, owner, None, ends, deadline).await?
        {
            // A job of one task, ended by its verification: as its ending transaction wrote
            // it, without reading it back.
            End::Sole(sole) => {
                let row = JobRow {
                    id: job,
                    owner,
                    name: spec.name.clone(),
                    spec: spec.clone(),
                    module: metered,
                    state: "completed".into(),
                    created_ms: now,
                    finished_ms: Some(sole.finished_ms),
                    counts: crate::store::Counts {
                        total: 1,
                        verified: 1,
                        ..Default::default()
                    },
                };
                let output = (sole.output.len() <= INLINE_OUTPUT).then(|| sole.output.clone());
                (row, Some(vec![(sole.task.clone(), output)]))
            }
            End::Read(row) => (*row, None),
        };
        if ended(&row.state) && row.counts.total <= SUBMIT_RESULTS {
            let tasks = match tasks {
                Some(tasks) => tasks,
                None => {
                    shared
                        .store
                        .tasks_with_outputs(job, 0, SUBMIT_RESULTS as u32, INLINE_OUTPUT)
                        .await?
                }
            };
            answer["results"] = json!(result_entries(tasks));
        }
        answer["job"] = job_json(&row);
    }
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// Micro-credits as a decimal credit string.
fn credits(micro: i128) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let m = micro.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

fn parse_job(body: &[u8]) -> ApiResult<(JobSpec, Vec<stardust_proto::job::Trial>)> {
    let spec: JobSpec = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_job_spec",
            format!("invalid job spec: {e}"),
        )
    })?;
    let trials = spec.expand().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_job",
            e.to_string(),
        )
    })?;
    Ok((spec, trials))
}

/// A price quote.
struct Quote {
    price_per_scu: u64,
    demand_milli: u64,
    max_cost: u64,
    market: Market,
}

async fn price(shared: &Shared, spec: &JobSpec, tasks: u64) -> ApiResult<Quote> {
    let idle: u64 = {
        let sessions = shared.sessions.lock().await;
        sessions.values().map(|s| u64::from(s.free())).sum()
    };
    let market = Market {
        backlog: shared.backlog().await?,
        idle,
    };
    let price_per_scu = pricing::price_per_scu(shared.config.pricing, market, spec.priority);
    Ok(Quote {
        price_per_scu,
        demand_milli: pricing::demand_milli(market),
        max_cost: pricing::job_maximum(tasks, spec.redundancy, spec.limits.fuel, price_per_scu),
        market,
    })
}

async fn quote(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<axum::Json<Value>> {
    let client = authenticate(&shared, &method, &uri, &headers, &body).await?;
    let (spec, trials) = parse_job(&body)?;
    let q = price(&shared, &spec, trials.len() as u64).await?;
    let balance = shared.store.balance(Account::Submitter(client)).await?;
    Ok(axum::Json(json!({
        "tasks": trials.len(),
        "redundancy": spec.redundancy,
        "fuel_limit": spec.limits.fuel,
        "base_per_scu": shared.config.pricing.base,
        "demand_milli": q.demand_milli,
        "priority_milli": pricing::priority_milli(spec.priority),
        "backlog": q.market.backlog,
        "idle_slots": q.market.idle,
        "price_per_scu": q.price_per_scu,
        "max_cost": q.max_cost,
        "max_credits": credits(q.max_cost.into()),
        "balance": balance,
        "affordable": balance >= i128::from(q.max_cost),
        "within_price_limit": spec.price_limit.is_none_or(|l| q.price_per_scu <= l),
    })))
}

/// The signing key's accounts.
async fn account(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    let key = authenticate(&shared, &method, &uri, &headers, &Bytes::new()).await?;
    let mut out = serde_json::Map::new();
    for (name, account) in [
        ("submitter", Account::Submitter(key)),
        ("operator", Account::Operator(key)),
        ("author", Account::Author(key)),
        ("stake", Account::Stake(key)),
    ] {
        out.insert(name.into(), json!(shared.store.balance(account).await?));
    }
    Ok(axum::Json(json!({ "key": key, "balances": out })))
}

/// Ledger totals (public: the ledger is auditable).
async fn ledger_summary(State(shared): State<Arc<Shared>>) -> ApiResult<axum::Json<Value>> {
    let (events, compute) = shared.store.ledger_head().await?;
    let balances = shared.store.balances().await?;
    let minted = balances
        .iter()
        .find(|(a, _)| *a == Account::Mint)
        .map_or(0, |(_, b)| -b);
    let treasury = balances
        .iter()
        .find(|(a, _)| *a == Account::Treasury)
        .map_or(0, |(_, b)| *b);
    let cpu_hours = stardust_ledger::curve::cpu_hours(u128::from(compute));
    Ok(axum::Json(json!({
        "events": events,
        "minted": minted,
        "treasury": treasury,
        "compute_micro_scu": compute,
        "cpu_hours": cpu_hours,
        "multiplier": stardust_ledger::curve::multiplier(cpu_hours),
    })))
}

/// The job, if it exists and `client` owns it (others get 404: existence is not revealed).
async fn owned_job(shared: &Shared, id: u64, client: NodeId) -> ApiResult<JobRow> {
    match shared.store.job(id).await? {
        Some(j) if j.owner == client => Ok(j),
        _ => Err(ApiError::not_found("job")),
    }
}

fn job_json(j: &JobRow) -> Value {
    json!({
        "job_id": j.id,
        "name": j.name,
        "state": j.state,
        "tasks_total": j.counts.total,
        "tasks_verified": j.counts.verified,
        "tasks_failed": j.counts.failed,
        "tasks_pending": j.counts.pending + j.counts.running,
        "tasks_running": j.counts.running,
        "tasks_cancelled": j.counts.cancelled,
        "redundancy": j.spec.redundancy,
        "created_ms": j.created_ms,
        "finished_ms": j.finished_ms,
    })
}

/// `GET /v1/jobs/{id}` options.
#[derive(Debug, Deserialize)]
struct JobQuery {
    /// Answer once the job has ended, or after this many milliseconds (long poll).
    #[serde(default)]
    wait_ms: u64,
}

/// The longest `wait_ms` a status request may ask for.
const MAX_WAIT_MS: u64 = 60_000;

/// Status requests one client key may hold open at once.
pub(crate) const MAX_WAITS_PER_KEY: u32 = 64;

/// Status requests held open at once, all keys together.
pub(crate) const MAX_WAITS: u32 = 8192;

/// Counts the status requests held open, per key and in all.
#[derive(Debug, Default)]
pub(crate) struct Waiters(std::sync::Mutex<(HashMap<NodeId, u32>, u32)>);

/// One held status request; counted until dropped.
struct Waiting<'a> {
    waiters: &'a Waiters,
    key: NodeId,
}

impl Waiters {
    /// Counts one more request held by `key`, or says which bound it would pass.
    fn enter(&self, key: NodeId) -> Result<Waiting<'_>, ApiError> {
        let mut w = self.0.lock().map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the domain's log",
            )
        })?;
        let (per_key, total) = &mut *w;
        if *total >= MAX_WAITS {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "{MAX_WAITS} status requests are held already; ask without wait_ms or retry later"
                ),
            ));
        }
        let mine = per_key.entry(key).or_insert(0);
        if *mine >= MAX_WAITS_PER_KEY {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_waits",
                format!("a key may hold {MAX_WAITS_PER_KEY} status requests with wait_ms at once"),
            ));
        }
        *mine += 1;
        *total += 1;
        Ok(Waiting { waiters: self, key })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiters.0.lock() {
            let (per_key, total) = &mut *w;
            *total = total.saturating_sub(1);
            if let Some(mine) = per_key.get_mut(&self.key) {
                *mine = mine.saturating_sub(1);
                if *mine == 0 {
                    per_key.remove(&self.key);
                }
            }
        }
    }
}

fn ended(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "cancelled")
}

async fn get_job(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<u64>,
    Query(query): Query<JobQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    let client = authenticate(&shared, &method, &uri, &headers, &Bytes::new()).await?;
    check_wait(query.wait_ms)?;
    // Subscribed before the first read: an end committed in between is told, not missed.
    let ends = shared.store.ended_jobs();
    let job = owned_job(&shared, id, client).await?;
    let _held = if query.wait_ms > 0 && !ended(&job.state) {
        Some(shared.waiters.enter(client)?)
    } else {
        None
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(query.wait_ms);
    let job = match wait_until_ended(&shared, id, client, Some(job), ends, deadline).await? {
        End::Read(job) => *job,
        End::Sole(_) => owned_job(&shared, id, client).await?,
    };
    Ok(axum::Json(job_json(&job)))
}

/// Refuses a `wait_ms` past [`MAX_WAIT_MS`].
fn check_wait(wait_ms: u64) -> ApiResult<()> {
    if wait_ms > MAX_WAIT_MS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_wait",
            format!("wait_ms is at most {MAX_WAIT_MS} (ask again to wait longer)"),
        ));
    }
    Ok(())
}

/// How a waited-for job was found ended: read back, or told with its one task
/// ([`crate::store::Ended::sole`]).
enum End {
    Read(Box<JobRow>),
    Sole(std::sync::Arc<crate::store::SoleTask>),
}

/// Job `id` (`client`'s, last read as `job`, or not read yet) once it has ended, or as it
/// is at `deadline`. `ends` was subscribed before `job` was read (or created), so an end in
/// between is not missed.
async fn wait_until_ended(
    shared: &Shared,
    id: u64,
    client: NodeId,
    mut job: Option<JobRow>,
    mut ends: tokio::sync::broadcast::Receiver<crate::store::Ended>,
    deadline: tokio::time::Instant,
) -> ApiResult<End> {
    while !job.as_ref().is_some_and(|j| ended(&j.state)) {
        let told = tokio::select! {
            told = ends.recv() => told,
            () = tokio::time::sleep_until(deadline) => break,
        };
        match told {
            Ok(e) if e.job != id => continue,
            Ok(crate::store::Ended {
                sole: Some(sole), ..
            }) => return Ok(End::Sole(sole)),
            // It ended, or ends were missed (lagged): read again.
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                job = Some(owned_job(shared, id, client).await?);
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    match job {
        Some(j) => Ok(End::Read(Box::new(j))),
        None => Ok(End::Read(Box::new(owned_job(shared, id, client).await?))),
    }
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    offset: u32,
    #[serde(default = "default_limit")]
    limit: u32,
}

fn default_limit() -> u32 {
    1000
}

async fn list_tasks(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<u64>,
    Query(page): Query<Page>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    let tasks = owned_tasks(&shared, id, &page, &method, &uri, &headers).await?;
    Ok(axum::Json(json!({ "tasks": tasks })))
}

/// A page of the tasks of a job the signed client owns.
async fn owned_tasks(
    shared: &Shared,
    id: u64,
    page: &Page,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> ApiResult<Vec<crate::store::TaskRow>> {
    let client = authenticate(shared, method, uri, headers, &Bytes::new()).await?;
    owned_job(shared, id, client).await?;
    Ok(shared
        .store
        .tasks(id, page.offset, page.limit.min(10_000))
        .await?)
}

/// Outputs up to this size are returned inline as text.
const INLINE_OUTPUT: usize = 64 << 10;

async fn results(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<u64>,
    Query(page): Query<Page>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    let client = authenticate(&shared, &method, &uri, &headers, &Bytes::new()).await?;
    owned_job(&shared, id, client).await?;
    let tasks = shared
        .store
        .tasks_with_outputs(id, page.offset, page.limit.min(10_000), INLINE_OUTPUT)
        .await?;
    Ok(axum::Json(json!({ "results": result_entries(tasks) })))
}

/// Tasks as `GET /v1/jobs/{id}/results` shows them, with the bytes of their outputs up to
/// [`INLINE_OUTPUT`]: those of valid UTF-8 inline as text.
fn result_entries(tasks: Vec<(crate::store::TaskRow, Option<Vec<u8>>)>) -> Vec<Value> {
    let mut out = Vec::with_capacity(tasks.len());
    for (t, bytes) in tasks {
        let mut entry = json!({ "task": t.id, "index": t.index, "args": t.args, "state": t.state, "reason": t.reason });
        if let Some(r) = &t.report {
            entry["status"] = json!(r.status);
            entry["exit_code"] = json!(r.exit_code);
            entry["fuel_used"] = json!(r.fuel_used);
            entry["output"] = json!(r.output);
            entry["output_len"] = json!(r.output_len);
            if let Some(bytes) = bytes
                && let Ok(text) = String::from_utf8(bytes)
            {
                entry["output_text"] = json!(text);
            }
        }
        out.push(entry);
    }
    out
}

async fn why(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    let client = authenticate(&shared, &method, &uri, &headers, &Bytes::new()).await?;
    let job = owned_job(&shared, id, client).await?;
    let pending: Vec<_> = shared
        .store
        .pending_tasks(10_000)
        .await?
        .into_iter()
        .filter(|p| p.spec.job == id)
        .collect();
    let views = node_views(&shared).await;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for p in &pending {
        let need = Need {
            requirements: &p.requirements,
            limits: &p.spec.limits,
            replicas_on: &p.replicas_on,
            sole: p.redundancy <= 1,
        };
        let why = match matching::pick(&need, &views) {
            Ok(_) => "a node can take it: it will be leased in the next dispatch round".to_string(),
            Err(why) => why.to_string(),
        };
        *reasons.entry(why).or_default() += 1;
    }
    let running = job.counts.running;
    let explanations: Vec<Value> = reasons
        .into_iter()
        .map(|(why, tasks)| json!({ "tasks": tasks, "why": why }))
        .collect();
    Ok(axum::Json(json!({
        "job_id": id,
        "state": job.state,
        "pending": pending.len(),
        "running": running,
        "explanations": explanations,
    })))
}

async fn node_views(shared: &Shared) -> Vec<NodeView> {
    shared
        .sessions
        .lock()
        .await
        .values()
        .map(crate::service::Session::view)
        .collect()
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<axum::Json<Value>> {
    let client = authenticate(&shared, &method, &uri, &headers, &body).await?;
    owned_job(&shared, id, client).await?;
    let leases = shared
        .store
        .cancel_job(id, now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    shared.cancel_leases(leases).await;
    let job = owned_job(&shared, id, client).await?;
    Ok(axum::Json(job_json(&job)))
}

async fn nodes(State(shared): State<Arc<Shared>>) -> ApiResult<axum::Json<Value>> {
    let stored = shared.store.nodes().await?;
    let credits = dashboard::credits(&shared).await?;
    let sessions = shared.sessions.lock().await;
    let list: Vec<Value> = stored
        .iter()
        .map(|n| {
            let (credits, stake) = credits.get(&n.id).copied().unwrap_or_default();
            let live = sessions.get(&n.id);
            let state = crate::service::node_state(live);
            json!({
                "id": n.id,
                "tier": n.tier,
                "hardware": n.hardware,
                "slots": n.slots,
                "state": state,
                "running": live.map_or(0, |s| s.running.len()),
                "reputation": live.map_or(n.record, |s| s.record).score(),
                "streak": n.record.streak,
                "spot_passed": n.spot_passed,
                "spot_failed": n.spot_failed,
                "uptime_ms": n.uptime_ms,
                "credits": credits,
                "stake": stake,
                "latency_ms": live.map(|s| s.latency_ms),
                "last_seen_ms": n.last_seen_ms,
                "agreed": n.agreed,
                "disagreed": n.disagreed,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "nodes": list })))
}
