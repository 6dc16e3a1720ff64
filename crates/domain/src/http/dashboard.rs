//! What people look at: the dashboard (`/`), its live feed (`/v1/dashboard` snapshots,
//! `/v1/events` as server-sent events, one snapshot a second), the contributor widget
//! (`/widget/{node}`, data at `/v1/nodes/{id}`), and Prometheus metrics (`/metrics`).
//!
//! A snapshot is built at most once a second and shared by every viewer ([`Snapshots`]),
//! and lists at most [`MAX_LISTED_NODES`] nodes, connected and busy ones first, with the
//! total beside them (`GET /v1/nodes` lists them all): at 100,000 nodes a full list was
//! 23 MB of JSON and ~0.7 s to build, per viewer, every second.
//!
//! Assets are embedded in the binary (no CDN). Jobs (names, progress, a sweep's results)
//! are shown to requests from this machine only, unless the domain runs with
//! `--public-dashboard`: job owners' data is theirs. Nodes, throughput, credits and the
//! contribution curve are public, like `GET /v1/nodes` and `GET /v1/ledger`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use stardust_ledger::Account;
use stardust_proto::identity::NodeId;

use super::{ApiError, ApiResult};
use crate::service::{Shared, now_ms};

const INDEX: &str = include_str!("../../../../web/dashboard/index.html");
const SCRIPT: &str = include_str!("../../../../web/dashboard/dashboard.js");
const WIDGET: &str = include_str!("../../../../web/dashboard/widget.html");

pub(crate) async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

pub(crate) async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

pub(crate) async fn widget() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], WIDGET).into_response()
}

/// Counts every request by route pattern and status.
pub(crate) async fn count_requests(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    shared.metrics.http_requests.inc(&[
        ("route", route.as_str()),
        ("status", response.status().as_str()),
    ]);
    response
}

/// Operator balances and stakes, by node.
pub(crate) async fn credits(shared: &Shared) -> ApiResult<HashMap<NodeId, (i128, i128)>> {
    let mut out: HashMap<NodeId, (i128, i128)> = HashMap::new();
    for (account, balance) in shared.store.balances().await? {
        match account {
            Account::Operator(n) => out.entry(n).or_default().0 = balance,
            Account::Stake(n) => out.entry(n).or_default().1 = balance,
            _ => {}
        }
    }
    Ok(out)
}

async fn ledger_totals(shared: &Shared) -> ApiResult<Value> {
    let (events, compute) = shared.store.ledger_head().await?;
    let cpu_hours = stardust_ledger::curve::cpu_hours(u128::from(compute));
    Ok(json!({
        "events": events,
        "compute_micro_scu": compute,
        "cpu_hours": cpu_hours,
        "multiplier": stardust_ledger::curve::multiplier(cpu_hours),
        "d_cpu_hours": stardust_ledger::curve::D_CPU_HOURS,
    }))
}

/// Nodes a snapshot lists at most.
pub(crate) const MAX_LISTED_NODES: usize = 500;

/// The last snapshot built for each kind of viewer (public, private), shared for a second.
/// Held while one is built, so viewers arriving meanwhile wait for it instead of building
/// their own.
#[derive(Default)]
pub(crate) struct Snapshots(tokio::sync::Mutex<[Option<Built>; 2]>);

/// A snapshot serialized, and when.
type Built = (std::time::Instant, Arc<String>);

/// How long a snapshot is served as it is.
const SNAPSHOT_TTL: Duration = Duration::from_secs(1);

/// A node as the dashboard lists it.
#[derive(serde::Serialize)]
struct NodeEntry {
    id: NodeId,
    tier: stardust_proto::task::Tier,
    cores: u32,
    memory_bytes: u64,
    gpus: usize,
    state: &'static str,
    running: usize,
    reputation: f64,
    agreed: u64,
    credits: i128,
    stake: i128,
    uptime_ms: i64,
}

/// The dashboard's view of the domain: its node list serialized as it is (tens of
/// thousands of nodes are not built as a tree of JSON values first), the rest as JSON.
#[derive(serde::Serialize)]
pub(crate) struct Snapshot {
    nodes: Vec<NodeEntry>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// The dashboard's view of the domain, serialized: the one built less than a second ago,
/// else a new one.
async fn shared_snapshot(shared: &Shared, private: bool) -> ApiResult<Arc<String>> {
    let mut built = shared.snapshots.0.lock().await;
    let slot = &mut built[usize::from(private)];
    if let Some((at, json)) = slot.as_ref()
        && at.elapsed() < SNAPSHOT_TTL
    {
        return Ok(json.clone());
    }
    let json = Arc::new(
        serde_json::to_string(&snapshot(shared, private).await?).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?,
    );
    *slot = Some((std::time::Instant::now(), json.clone()));
    Ok(json)
}

/// Keeps the [`MAX_LISTED_NODES`] nodes most worth seeing: connected before offline, then
/// the busiest, then those with the most credits; ties by id.
fn listed(mut nodes: Vec<NodeEntry>) -> Vec<NodeEntry> {
    let key = |n: &NodeEntry| {
        (
            n.state == crate::service::node_state(None),
            std::cmp::Reverse(n.running),
            std::cmp::Reverse(n.credits),
            n.id,
        )
    };
    if nodes.len() > MAX_LISTED_NODES {
        nodes.select_nth_unstable_by_key(MAX_LISTED_NODES, key);
        nodes.truncate(MAX_LISTED_NODES);
    }
    nodes.sort_unstable_by_key(key);
    nodes
}

/// The dashboard's view of the domain now.
async fn snapshot(shared: &Shared, private: bool) -> ApiResult<Snapshot> {
    let credits = credits(shared).await?;
    let stored = shared.store.nodes().await?;
    // What the sessions say, copied out: the lock is held by heartbeats, results and
    // dispatch, not to be held while thousands of nodes are listed.
    let (live, connected): (HashMap<NodeId, (&'static str, usize, f64)>, usize) = {
        let sessions = shared.sessions.lock().await;
        let live = sessions
            .iter()
            .map(|(id, s)| {
                let state = crate::service::node_state(Some(s));
                (*id, (state, s.running.len(), s.record.score()))
            })
            .collect();
        (live, sessions.len())
    };
    let nodes: Vec<NodeEntry> = stored
        .iter()
        .map(|n| {
            let (state, running, reputation) = live.get(&n.id).copied().unwrap_or((
                crate::service::node_state(None),
                0,
                n.record.score(),
            ));
            let (credits, stake) = credits.get(&n.id).copied().unwrap_or_default();
            NodeEntry {
                id: n.id,
                tier: n.tier,
                cores: n.hardware.cores,
                memory_bytes: n.hardware.memory_bytes,
                gpus: n.hardware.gpus.len(),
                state,
                running,
                reputation,
                agreed: n.agreed,
                credits,
                stake,
                uptime_ms: n.uptime_ms,
            }
        })
        .collect();
    let nodes_total = nodes.len();
    let nodes = listed(nodes);
    let mut leaderboard: Vec<(NodeId, i128)> = credits
        .iter()
        .map(|(n, (c, _))| (*n, *c))
        .filter(|(_, c)| *c > 0)
        .collect();
    leaderboard.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let leaderboard: Vec<Value> = leaderboard
        .iter()
        .take(10)
        .map(|(n, c)| json!({ "id": n, "credits": c }))
        .collect();
    let series: Vec<Value> = shared
        .samples
        .lock()
        .map(|s| s.iter().map(|x| json!(x)).collect())
        .unwrap_or_default();
    let mut out = json!({
        "domain": shared.identity.id(),
        "now_ms": now_ms(),
        "connected": connected,
        "nodes_total": nodes_total,
        "leaderboard": leaderboard,
        "series": series,
        "ledger": ledger_totals(shared).await?,
        "jobs_visible": private,
    });
    if private {
        let jobs = shared.store.recent_jobs(20).await?;
        out["jobs"] = Value::Array(
            jobs.iter()
                .map(|j| {
                    let done = j.counts.verified + j.counts.failed + j.counts.cancelled;
                    let mut v = super::job_json(j);
                    v["progress"] = json!(if j.counts.total == 0 {
                        1.0
                    } else {
                        done as f64 / j.counts.total as f64
                    });
                    v
                })
                .collect(),
        );
        if let Some(job) = jobs.iter().find(|j| j.spec.sweep.is_some()) {
            out["sweep"] = sweep(shared, job).await?;
        }
    }
    let Value::Object(rest) = out else {
        unreachable!("built as an object above")
    };
    Ok(Snapshot { nodes, rest })
}

/// A sweep job's verified results as points: the swept parameter with the most values on
/// x, the first numeric output field named like an accuracy or score (else the first
/// numeric one) on y. Outputs must be JSON objects.
async fn sweep(shared: &Shared, job: &crate::store::JobRow) -> ApiResult<Value> {
    let trials = job.spec.expand().unwrap_or_default();
    let x_param = {
        let mut distinct: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for t in &trials {
            for (k, v) in &t.params {
                let vs = distinct.entry(k.as_str()).or_default();
                let v = serde_json::to_string(v).unwrap_or_default();
                if !vs.contains(&v) {
                    vs.push(v);
                }
            }
        }
        distinct
            .iter()
            .max_by_key(|(k, v)| (v.len(), std::cmp::Reverse(*k)))
            .map(|(k, _)| (*k).to_string())
    };
    // One statement for the tasks and their outputs (one read per output held SQLite's
    // connection 2,000 times, between heartbeats).
    let tasks = shared
        .store
        .tasks_with_outputs(job.id, 0, 2_000, 64 << 10)
        .await?;
    let mut points = Vec::new();
    let mut metric: Option<String> = None;
    for (t, bytes) in tasks.iter().filter(|(t, _)| t.state == "verified") {
        let Some(bytes) = bytes else {
            continue;
        };
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(bytes) else {
            continue;
        };
        let m = metric.get_or_insert_with(|| {
            let numeric: Vec<&String> = fields.keys().filter(|k| fields[*k].is_number()).collect();
            let scored = |k: &&&String| k.contains("accuracy") || k.contains("score");
            let held_out = |k: &&&String| k.starts_with("val") || k.starts_with("test");
            numeric
                .iter()
                .find(|k| scored(k) && held_out(k))
                .or_else(|| numeric.iter().find(|k| scored(k)))
                .or_else(|| numeric.first())
                .map_or_else(String::new, |k| (*k).clone())
        });
        let Some(y) = fields.get(m.as_str()).and_then(Value::as_f64) else {
            continue;
        };
        let params = trials
            .get(t.index as usize)
            .map(|tr| json!(tr.params))
            .unwrap_or(Value::Null);
        let x = x_param
            .as_deref()
            .and_then(|p| params.get(p))
            .cloned()
            .unwrap_or(json!(t.index));
        points.push(json!({ "index": t.index, "x": x, "y": y, "params": params }));
    }
    Ok(json!({
        "job_id": job.id,
        "name": job.name,
        "x": x_param.unwrap_or_else(|| "task".into()),
        "metric": metric.unwrap_or_default(),
        "points": points,
    }))
}

fn private(shared: &Shared, addr: &SocketAddr) -> bool {
    shared.config.public_dashboard || addr.ip().is_loopback()
}

pub(crate) async fn dashboard(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
) -> ApiResult<Response> {
    let json = shared_snapshot(&shared, private(&shared, &addr)).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        json.as_str().to_owned(),
    )
        .into_response())
}

/// One snapshot a second, as server-sent events (`event: snapshot`).
pub(crate) async fn events(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
) -> ApiResult<Response> {
    let Ok(permit) = shared.streams.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many dashboards are open; retry later",
        ));
    };
    let private = private(&shared, &addr);
    let shutdown = shared.shutdown.clone();
    let stream =
        futures_util::stream::unfold((shared, permit, true), move |(shared, permit, first)| {
            let mut shutdown = shutdown.clone();
            async move {
                if !first {
                    tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => return None,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                let data = match shared_snapshot(&shared, private).await {
                    Ok(json) => json.as_str().to_owned(),
                    Err(_) => "{}".to_string(),
                };
                let event = Event::default().event("snapshot").data(data);
                Some((Ok::<_, Infallible>(event), (shared, permit, false)))
            }
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// A node's public figures, for the contributor widget.
pub(crate) async fn node_stats(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let id: NodeId = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_node_id",
            "a node id is 64 hex digits",
        )
    })?;
    let node = shared
        .store
        .node(id)
        .await?
        .ok_or_else(|| ApiError::not_found("node"))?;
    let credits = credits(&shared).await?;
    let mine = credits.get(&id).map_or(0, |c| c.0);
    let rank = 1 + credits.values().filter(|(c, _)| *c > mine).count();
    let top = credits
        .values()
        .map(|(c, _)| *c)
        .max()
        .unwrap_or(0)
        .max(mine);
    let online = shared.sessions.lock().await.contains_key(&id);
    Ok(axum::Json(json!({
        "id": id,
        "online": online,
        "credits": mine,
        "tasks": node.agreed,
        "rank": rank,
        "contributors": credits.values().filter(|(c, _)| *c > 0).count().max(1),
        "share_of_top": if top > 0 { mine as f64 / top as f64 } else { 0.0 },
        "uptime_ms": node.uptime_ms,
        "reputation": node.record.score(),
        "ledger": ledger_totals(&shared).await?,
    })))
}

/// Prometheus text format 0.0.4.
pub(crate) async fn metrics(State(shared): State<Arc<Shared>>) -> ApiResult<Response> {
    use crate::metrics::gauge;
    let mut out = String::new();
    shared
        .metrics
        .encode(&mut out, &shared.rejections.snapshot());
    let mut states: BTreeMap<String, u64> =
        ["pending", "running", "verified", "failed", "cancelled"]
            .iter()
            .map(|s| ((*s).to_string(), 0))
            .collect();
    for (state, n) in shared.store.task_states().await? {
        states.insert(state, n);
    }
    let tasks: Vec<_> = states
        .into_iter()
        .map(|(s, n)| (vec![("state", s)], n as f64))
        .collect();
    gauge(&mut out, "stardust_tasks", "Tasks by state.", &tasks);
    let (connected, leased) = {
        let sessions = shared.sessions.lock().await;
        (
            sessions.len(),
            sessions.values().map(|s| s.running.len()).sum::<usize>(),
        )
    };
    gauge(
        &mut out,
        "stardust_nodes_connected",
        "Node sessions open now.",
        &[(vec![], connected as f64)],
    );
    gauge(
        &mut out,
        "stardust_leases_active",
        "Leases held by connected nodes.",
        &[(vec![], leased as f64)],
    );
    let (events, compute) = shared.store.ledger_head().await?;
    let balances = shared.store.balances().await?;
    let sum = |f: &dyn Fn(&Account) -> bool| -> f64 {
        balances
            .iter()
            .filter(|(a, _)| f(a))
            .map(|(_, b)| *b as f64)
            .sum()
    };
    gauge(
        &mut out,
        "stardust_ledger_events",
        "Events in the ledger.",
        &[(vec![], events as f64)],
    );
    gauge(
        &mut out,
        "stardust_ledger_microcredits",
        "Ledger totals by kind of account (minted is the mint's deficit).",
        &[
            (
                vec![("account", "minted".into())],
                -sum(&|a| *a == Account::Mint),
            ),
            (
                vec![("account", "treasury".into())],
                sum(&|a| *a == Account::Treasury),
            ),
            (
                vec![("account", "escrow".into())],
                sum(&|a| matches!(a, Account::Escrow(_))),
            ),
            (
                vec![("account", "operators".into())],
                sum(&|a| matches!(a, Account::Operator(_))),
            ),
            (
                vec![("account", "submitters".into())],
                sum(&|a| matches!(a, Account::Submitter(_))),
            ),
            (
                vec![("account", "stake".into())],
                sum(&|a| matches!(a, Account::Stake(_))),
            ),
        ],
    );
    gauge(
        &mut out,
        "stardust_compute_micro_scu",
        "Verified compute to date, µSCU (the contribution curve's x).",
        &[(vec![], compute as f64)],
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32, state: &'static str, running: usize, credits: i128) -> NodeEntry {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&i.to_le_bytes());
        NodeEntry {
            id: stardust_proto::identity::Identity::from_secret_bytes(&seed).id(),
            tier: stardust_proto::task::Tier::Small,
            cores: 1,
            memory_bytes: 1 << 30,
            gpus: 0,
            state,
            running,
            reputation: 0.5,
            agreed: 0,
            credits,
            stake: 0,
            uptime_ms: 0,
        }
    }

    #[test]
    fn a_crowd_is_listed_connected_and_busy_first_and_bounded() {
        let offline = crate::service::node_state(None);
        let mut nodes = Vec::new();
        // Many offline nodes with credits, a few connected ones, some busy.
        for i in 0..1_000 {
            nodes.push(entry(i, offline, 0, 1_000_000 + i128::from(i)));
        }
        for i in 1_000..1_100 {
            nodes.push(entry(i, "online", 0, 0));
        }
        nodes.push(entry(2_000, "paused", 3, 0));
        nodes.push(entry(2_001, "online", 7, 5));
        let list = listed(nodes);
        assert_eq!(list.len(), MAX_LISTED_NODES);
        assert_eq!((list[0].state, list[0].running), ("online", 7));
        assert_eq!((list[1].state, list[1].running), ("paused", 3));
        assert!(list[..102].iter().all(|n| n.state != offline));
        // Then offline nodes, the most credited first.
        assert_eq!(list[102].credits, 1_000_999);
        assert!(list[102..].windows(2).all(|w| w[0].credits >= w[1].credits));
        // A short list is kept whole.
        assert_eq!(
            listed(vec![entry(1, offline, 0, 0), entry(2, "online", 0, 0)]).len(),
            2
        );
    }
}
