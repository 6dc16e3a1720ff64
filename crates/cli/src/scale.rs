//! `stardust bench scale`: many simulated nodes against one coordinator.
//!
//! ```text
//!  bench scale ──spawns──▶ stardust domain (child; RSS and CPU read from /proc)
//!      │        ──spawns──▶ P × `bench scale-sim` (children, each from its own loopback
//!      │                     address 127.0.0.k, raised file-descriptor limit)
//!      └── submits trivial tasks, polls /metrics until every node is connected and the
//!          tasks are verified, then stops everything and reports
//! ```
//!
//! A simulated node is the real protocol without a sandbox: its own Ed25519 key, the
//! signed hello answering the challenge, signed heartbeats on the domain's interval listing
//! its leases, and a signed result for each assignment (all simulated nodes answer the same
//! small output, inline in the result as real nodes send it, so replicas agree). Bounded: `--nodes` ≤ 100,000, `--duration`
//! ≤ 10 min.

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use stardust_proto::content::ContentId;
use stardust_proto::identity::Identity;
use stardust_proto::message::{
    self, DomainMessage, Hello, Inline, NodeMessage, ResultBatch, TaskResult, encode,
};
use stardust_proto::task::{Hardware, LeaseId, RunReport, Status, Tier};
use tokio_tungstenite::tungstenite::Message;

/// The output every simulated node reports (inline in its results).
const OUTPUT: &[u8] = b"simulated\n";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: u32,
    /// Simulator processes (each from its own loopback address).
    #[arg(long, default_value_t = 4)]
    procs: u32,
    /// Trivial tasks to serve once every node is connected (redundancy 1).
    #[arg(long, default_value_t = 2000)]
    tasks: u32,
    /// How long to keep the nodes connected and heartbeating after the tasks are done.
    #[arg(long, default_value = "20s", value_parser = crate::units::parse_duration)]
    duration: Duration,
    /// Connection gateways between the nodes and the domain (`stardust gateway`
    /// processes; 0: the nodes connect to the domain itself). Past one process's descriptor
    /// limit, nodes need them.
    #[arg(long, default_value_t = 0)]
    gateways: u32,
    /// Heartbeat interval the domain asks for.
    #[arg(long, default_value = "5s", value_parser = crate::units::parse_duration)]
    heartbeat: Duration,
    /// Print one JSON object as the last stdout line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    #[arg(long)]
    domain: String,
    #[arg(long)]
    nodes: u32,
    /// First key index (keys are derived from it, distinct across processes).
    #[arg(long)]
    first: u32,
    /// Loopback source address.
    #[arg(long)]
    source: std::net::IpAddr,
    #[arg(long, value_parser = crate::units::parse_duration)]
    duration: Duration,
}

use crate::bench::Kill;

/// `sh -c 'ulimit -n N; exec stardust ARGS'`: a child with a raised descriptor limit.
fn spawn_with_fds(args: &[String], fds: u32, log: &std::path::Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(log)?;
    Ok(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {fds} 2>/dev/null || ulimit -n $(ulimit -Hn); exec \"$0\" \"$@\""
        ))
        .arg(exe)
        .args(args)
        .env(
            crate::bench::EXIT_WITH_PARENT,
            crate::bench::parent_marker(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?)
}

fn proc_stats(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 (1-based); after the ')' they are 12 and 13.
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (rss_kb * 1024, ticks / 100.0)
}

/// Value of an unlabelled sample, or the sum over a family's labelled samples.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            rest.starts_with(' ') || rest.starts_with('{')
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A Prometheus histogram's cumulative buckets: (upper bound, count), in the text's order.
fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect()
}

/// What a histogram counted between two scrapes (`before` taken first).
fn since(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, (n - was).max(0.0))
        })
        .collect()
}

/// A quantile of cumulative buckets: the upper bound of the bucket holding it (0 when
/// nothing was counted).
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return 0.0;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::INFINITY, |(le, _)| *le)
}

/// A plain HTTP/1.1 GET over loopback (the endpoints read here are unsigned).
async fn get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http:// URL")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .context("GET timed out")??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // De-chunk: size line, data, CRLF.
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
        }
        return Ok(out);
    }
    Ok(body.to_string())
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 || args.nodes > 100_000 || args.procs == 0 || args.procs > 64 {
        bail!("need 1 ≤ --nodes ≤ 100000 and 1 ≤ --procs ≤ 64");
    }
    if args.gateways > 16 {
        bail!("--gateways is at most 16");
    }
    // Every socket is a descriptor, and a process may not hold more than its hard limit.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    let fits = |sockets: u32, spare: u32| u64::from(sockets) + u64::from(spare) <= hard;
    let holders = args.gateways.max(1);
    if !fits(args.nodes.div_ceil(holders), 1024) {
        let need = (u64::from(args.nodes)).div_ceil(hard.saturating_sub(1024).max(1));
        bail!(
            "{} nodes need more sockets than one process may hold here (ulimit -Hn: {hard}); \
             put connection gateways between them and the domain: --gateways {need} or more",
            args.nodes
        );
    }
    let mut args = args;
    if !fits(args.nodes.div_ceil(args.procs), 256) {
        let procs = u64::from(args.nodes).div_ceil(hard.saturating_sub(256).max(1));
        let procs = u32::try_from(procs).unwrap_or(u32::MAX);
        eprintln!(
            "{} simulator processes for {} nodes (each may hold {hard} descriptors)",
            procs, args.nodes
        );
        args.procs = procs;
    }
    if args.procs > 64 {
        bail!("the nodes need more than 64 simulator processes here");
    }
    if args.duration > Duration::from_secs(600) {
        bail!("--duration is at most 10 minutes");
    }
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let fds = args.nodes + 1024;
    // Each gateway's key, listed on the domain.
    let mut gateway_keys = Vec::new();
    for g in 0..args.gateways {
        let data = dir.path().join(format!("gateway{g}"));
        std::fs::create_dir_all(&data)?;
        gateway_keys.push(stardust_keystore::load_or_create(&data.join("gateway.key"))?.id());
    }
    let hb = format!("{}ms", args.heartbeat.as_millis());
    let lease = format!("{}ms", (args.heartbeat.as_millis() * 6).max(30_000));
    let domain_args: Vec<String> = [
        "domain",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data",
        dir.path().join("domain").to_str().unwrap_or("domain"),
        "--heartbeat",
        &hb,
        "--lease",
        &lease,
        "--welcome-grant",
        "1000000000",
        "--spot-rate",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        gateway_keys
            .iter()
            .flat_map(|k| ["--gateway-key".to_string(), k.to_string()]),
    )
    .collect();
    let mut children = Kill(Vec::new());
    children.0.push(spawn_with_fds(
        &domain_args,
        fds,
        &dir.path().join("domain.log"),
    )?);
    let domain_pid = children.0[0].id();
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        let client = stardust_sdk::Client::new(&url, stardust_keystore::generate()?)?;
        let t0 = Instant::now();
        while client.health().await.is_err() {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the domain did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (rss_idle, _) = proc_stats(domain_pid);
        // The gateways, each linked to the domain before any node comes.
        let mut gateways = Vec::new();
        let per_gateway = args.nodes.div_ceil(args.gateways.max(1));
        for g in 0..args.gateways {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let gw: Vec<String> = [
                "gateway".to_string(), "--domain".into(), url.clone(),
                "--listen".into(), format!("127.0.0.1:{port}"),
                "--data".into(), dir.path().join(format!("gateway{g}")).to_string_lossy().into_owned(),
                "--max-sessions".into(), (per_gateway + 1000).to_string(),
            ]
            .to_vec();
            children.0.push(spawn_with_fds(&gw, per_gateway + 1024, &dir.path().join(format!("gateway{g}.log")))?);
            gateways.push((children.0[children.0.len() - 1].id(), format!("http://127.0.0.1:{port}")));
        }
        for (_, gw) in &gateways {
            let t0 = Instant::now();
            while get(&format!("{gw}/v1/health")).await.map_or(true, |b| !b.contains("\"ok\":true")) {
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("the gateway at {gw} did not link to the domain");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let gateway_stats = |gateways: &[(u32, String)]| {
            gateways.iter().fold((0u64, 0f64), |(r, c), (pid, _)| {
                let (rss, cpu) = proc_stats(*pid);
                (r + rss, c + cpu)
            })
        };
        let per = args.nodes.div_ceil(args.procs);
        let started = Instant::now();
        let mut first = 0;
        for p in 0..args.procs {
            let n = per.min(args.nodes - first);
            if n == 0 {
                break;
            }
            // With gateways, each simulator connects to one of them, in turn.
            let target = match gateways.is_empty() {
                true => url.clone(),
                false => gateways[p as usize % gateways.len()].1.clone(),
            };
            let sim: Vec<String> = [
                "bench".to_string(), "scale-sim".into(), "--domain".into(), target,
                "--nodes".into(), n.to_string(), "--first".into(), first.to_string(),
                "--source".into(), format!("127.0.0.{}", 2 + p), "--duration".into(),
                format!("{}ms", (args.duration + Duration::from_secs(600)).as_millis()),
            ]
            .to_vec();
            children.0.push(spawn_with_fds(&sim, n + 256, &dir.path().join(format!("sim{p}.log")))?);
            first += n;
        }
        let metrics_url = format!("{url}/metrics");
        let connect_deadline = Duration::from_secs(120 + u64::from(args.nodes) / 100);
        const BEATS: &str = "stardust_heartbeat_latency_seconds";
        let (connect_s, beats_connected) = loop {
            let m = get(&metrics_url).await?;
            if metric(&m, "stardust_nodes_connected") as u32 >= args.nodes {
                break (started.elapsed().as_secs_f64(), histogram(&m, BEATS));
            }
            if started.elapsed() > connect_deadline {
                bail!(
                    "only {} of {} nodes connected after {connect_deadline:?}",
                    metric(&m, "stardust_nodes_connected"),
                    args.nodes
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let module = crate::bench::trivial_module()?;
        let module = client.put_blob(module).await?;
        let input = client.put_blob(Vec::new()).await?;
        let spec: stardust_proto::job::JobSpec = serde_json::from_value(json!({
            "module": module.to_string(),
            "input": input.to_string(),
            "args": ["{i}"],
            "limits": crate::bench::trivial_limits(),
            "sweep": {"grid": {"i": (0..args.tasks).collect::<Vec<_>>()}},
        }))?;
        let served_t = Instant::now();
        let job = client.submit(&spec).await?;
        let status = tokio::time::timeout(Duration::from_secs(600), client.wait(job, |_| {}))
            .await
            .context("tasks not served within 10 minutes")??;
        let serve_s = served_t.elapsed().as_secs_f64();
        // Keep heartbeating a while, sampling the coordinator.
        let beats_before = histogram(&get(&metrics_url).await?, BEATS);
        let (_, cpu_before) = proc_stats(domain_pid);
        let (_, gw_cpu_before) = gateway_stats(&gateways);
        let hold = Instant::now();
        let mut rss_peak = 0;
        let mut gw_rss_peak = 0;
        while hold.elapsed() < args.duration {
            rss_peak = rss_peak.max(proc_stats(domain_pid).0);
            gw_rss_peak = gw_rss_peak.max(gateway_stats(&gateways).0);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (rss, cpu_after) = proc_stats(domain_pid);
        let (gw_rss, gw_cpu_after) = gateway_stats(&gateways);
        let m = get(&metrics_url).await?;
        let beats_run = histogram(&m, BEATS);
        let beats_held = since(&beats_run, &beats_before);
        // Dashboard responsiveness with every node connected.
        let mut dash = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let body = get(&format!("{url}/v1/dashboard")).await?;
            dash.push(t.elapsed().as_secs_f64() * 1e3);
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["nodes_total"].as_u64().unwrap_or(0) < u64::from(args.nodes) || v["nodes"].as_array().is_none_or(Vec::is_empty) {
                bail!("the dashboard does not count every node or lists none: {}", &body[..body.len().min(300)]);
            }
        }
        dash.sort_by(f64::total_cmp);
        Ok(json!({
            "nodes": args.nodes,
            "nodes_connected": metric(&m, "stardust_nodes_connected") as u64,
            "connect_s": connect_s,
            "rss_bytes": rss_peak.max(rss),
            "rss_idle_bytes": rss_idle,
            "cpu_s_per_s": (cpu_after - cpu_before) / args.duration.as_secs_f64(),
            // The gateways' processes, all together (0 without gateways).
            "gateways": args.gateways,
            "gateway_rss_bytes": gw_rss_peak.max(gw_rss),
            "gateway_cpu_s_per_s": (gw_cpu_after - gw_cpu_before) / args.duration.as_secs_f64(),
            // With every node connected and no work (the hold): heartbeats on time or not.
            "heartbeats": beats_held.last().map_or(0.0, |b| b.1) as u64,
            "heartbeat_lag_p50_ms": 1e3 * quantile(&beats_held, 0.5),
            "heartbeat_lag_p99_ms": 1e3 * quantile(&beats_held, 0.99),
            // While the crowd connected; then while the tasks were served.
            "heartbeat_lag_p99_ms_connecting": 1e3 * quantile(&beats_connected, 0.99),
            "heartbeat_lag_p99_ms_serving": 1e3 * quantile(&since(&beats_before, &beats_connected), 0.99),
            // The whole run: the crowd connecting and the tasks served included.
            "heartbeats_run": beats_run.last().map_or(0.0, |b| b.1) as u64,
            "heartbeat_lag_p99_ms_run": 1e3 * quantile(&beats_run, 0.99),
            "tasks_served": status["tasks_verified"],
            "serve_s": serve_s,
            "dashboard_ms_median": dash[dash.len() / 2],
            "dashboard_ms_max": dash[dash.len() - 1],
        }))
    });
    drop(children);
    let result = result?;
    if args.json {
        println!("{result}");
    } else {
        println!(
            "{} simulated nodes: all connected in {:.1} s; coordinator RSS {:.0} MiB (idle {:.0} MiB), CPU {:.2} cores while heartbeating; heartbeat handling then p50 ≤ {} ms, p99 ≤ {} ms ({} heartbeats; p99 ≤ {} ms over the whole run); {} tasks served in {:.1} s; dashboard snapshot {:.0} ms (max {:.0} ms)",
            result["nodes_connected"],
            result["connect_s"].as_f64().unwrap_or(0.0),
            result["rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            result["rss_idle_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            result["cpu_s_per_s"].as_f64().unwrap_or(0.0),
            result["heartbeat_lag_p50_ms"],
            result["heartbeat_lag_p99_ms"],
            result["heartbeats"],
            result["heartbeat_lag_p99_ms_run"],
            result["tasks_served"],
            result["serve_s"].as_f64().unwrap_or(0.0),
            result["dashboard_ms_median"].as_f64().unwrap_or(0.0),
            result["dashboard_ms_max"].as_f64().unwrap_or(0.0),
        );
        if args.gateways > 0 {
            println!(
                "{} gateways between them and the domain: RSS {:.0} MiB together, CPU {:.2} cores while heartbeating",
                args.gateways,
                result["gateway_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                result["gateway_cpu_s_per_s"].as_f64().unwrap_or(0.0),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One simulator process: `nodes` sessions from `source`.
pub fn sim(args: SimArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let addr: std::net::SocketAddr = args
            .domain
            .strip_prefix("http://")
            .context("http:// domain")?
            .parse()?;
        let stop = Instant::now() + args.duration;
        let mut tasks = Vec::new();
        for i in 0..args.nodes {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&(args.first + i).to_le_bytes());
            seed[4] = 0x5c;
            let key = Identity::from_secret_bytes(&seed);
            tasks.push(tokio::spawn(node(addr, args.source, key, stop)));
            if i % 64 == 63 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut results = 0u64;
        let mut failed = 0u64;
        for t in tasks {
            match t.await {
                Ok(Ok(n)) => results += n,
                _ => failed += 1,
            }
        }
        println!("{}", json!({ "results": results, "failed": failed }));
        Ok(ExitCode::SUCCESS)
    })
}

/// A simulated node: like a real one, it retries with backoff until its session opens (a
/// crowd connecting at once meets the domain's per-address rate limit).
async fn node(
    domain: std::net::SocketAddr,
    source: std::net::IpAddr,
    key: Identity,
    stop: Instant,
) -> anyhow::Result<u64> {
    let mut wait = Duration::from_millis(200);
    loop {
        match open_session(domain, source, &key).await {
            Ok((mut ws, heartbeat_ms)) => return serve(&mut ws, &key, heartbeat_ms, stop).await,
            Err(_) if Instant::now() < stop => {
                let jitter = u64::from(key.secret_bytes()[2]) * wait.as_millis() as u64 / 512;
                tokio::time::sleep(wait + Duration::from_millis(jitter)).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

fn next(b: &[u8]) -> Option<DomainMessage> {
    message::decode::<DomainMessage>(b, 1 << 24)
        .ok()
        .map(|(_, m)| m)
}

async fn open_session(
    domain: std::net::SocketAddr,
    source: std::net::IpAddr,
    key: &Identity,
) -> anyhow::Result<(Ws, u64)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    let tcp = socket.connect(domain).await?;
    tcp.set_nodelay(true)?;
    // Small buffers, as the domain's side of a session has: 100,000 simulated nodes with
    // tungstenite's defaults (128 KiB to read) took 12 GiB.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .write_buffer_size(8 << 10);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{domain}/v1/nodes/connect"),
        tcp,
        Some(config),
    )
    .await?;
    let nonce = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                if let Some(DomainMessage::Challenge { nonce, .. }) = next(&b) {
                    break nonce;
                }
            }
            Some(Ok(_)) => continue,
            _ => bail!("no challenge"),
        }
    };
    let hello = Hello {
        nonce,
        agent: "stardust-bench-scale".into(),
        slots: 1,
        hardware: Hardware {
            cores: 1,
            memory_bytes: 1 << 30,
            ..Hardware::default()
        },
        tier: Tier::Small,
        queue: None,
    };
    ws.send(Message::Binary(encode(key, &hello).into())).await?;
    let heartbeat_ms = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => match next(&b) {
                Some(DomainMessage::Welcome { heartbeat_ms, .. }) => break heartbeat_ms,
                Some(DomainMessage::Reject { message, .. }) => bail!("rejected: {message}"),
                _ => continue,
            },
            Some(Ok(_)) => continue,
            _ => bail!("no welcome"),
        }
    };
    Ok((ws, heartbeat_ms))
}

async fn serve(
    ws: &mut Ws,
    key: &Identity,
    heartbeat_ms: u64,
    stop: Instant,
) -> anyhow::Result<u64> {
    let output = ContentId::of(OUTPUT);
    let mut running: Vec<LeaseId> = Vec::new();
    let mut seq = 0u64;
    let mut results = 0u64;
    // Spread the first heartbeats over the interval.
    let offset = u64::from(key.secret_bytes()[0] ^ key.secret_bytes()[1]) * heartbeat_ms / 256;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(offset),
        Duration::from_millis(heartbeat_ms),
    );
    while Instant::now() < stop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let hb = NodeMessage::Heartbeat { seq, running: running.clone(), free_slots: 1 };
                ws.send(Message::Binary(encode(key, &hb).into())).await?;
            }
            frame = ws.next() => {
                let Some(Ok(frame)) = frame else { bail!("the domain closed the session") };
                let Message::Binary(b) = frame else { continue };
                match next(&b) {
                    Some(DomainMessage::Assign { tasks }) => {
                        let mut batch = Vec::with_capacity(tasks.len());
                        for a in tasks {
                            running.push(a.lease);
                            batch.push(TaskResult {
                                lease: a.lease,
                                task: a.spec.task,
                                report: RunReport {
                                    status: Status::Ok,
                                    trap: None,
                                    exit_code: Some(0),
                                    fuel_used: 1,
                                    output,
                                    output_len: OUTPUT.len() as u64,
                                    wall_ms: 0,
                                    detail: None,
                                },
                                // As a real node does with a small output.
                                output: Some(Inline(OUTPUT.to_vec())),
                            });
                        }
                        results += batch.len() as u64;
                        ws.send(Message::Binary(encode(key, &ResultBatch { results: batch }).into())).await?;
                    }
                    Some(DomainMessage::Ack { leases } | DomainMessage::Cancel { leases }) => {
                        running.retain(|l| !leases.contains(l));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# TYPE h histogram
h_bucket{le=\"0.001\"} 90
h_bucket{le=\"1\"} 99
h_bucket{le=\"+Inf\"} 100
h_count 100
";

    #[test]
    fn quantiles_are_the_upper_bound_of_their_bucket() {
        let h = histogram(SCRAPE, "h");
        assert_eq!(h, vec![(0.001, 90.0), (1.0, 99.0), (f64::INFINITY, 100.0)]);
        assert_eq!(quantile(&h, 0.5), 0.001);
        assert_eq!(quantile(&h, 0.99), 1.0);
        assert_eq!(quantile(&h, 1.0), f64::INFINITY);
        assert_eq!(quantile(&[], 0.99), 0.0);
    }

    #[test]
    fn a_phase_is_measured_on_its_own() {
        // 100 slow beats while connecting, then 100 fast ones.
        let before = vec![(0.001, 0.0), (1.0, 0.0), (f64::INFINITY, 100.0)];
        let after = vec![(0.001, 100.0), (1.0, 100.0), (f64::INFINITY, 200.0)];
        let held = since(&after, &before);
        assert_eq!(
            held,
            vec![(0.001, 100.0), (1.0, 100.0), (f64::INFINITY, 100.0)]
        );
        assert_eq!(quantile(&held, 0.99), 0.001);
        assert_eq!(quantile(&after, 0.99), f64::INFINITY);
    }
}
