//! `stardust demo`: the whole network on this machine, in one command. An embedded domain
//! (SQLite), N nodes (real node runtimes, real sandboxes, in this process), and the
//! hyperparameter-search example submitted, verified, paid and audited; then a leaderboard,
//! the verification and credit summaries, the ledger check, and an HTML report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::units::credits;

/// The example, built into the binary so the demo runs from anywhere.
const EXAMPLE: &[(&str, &[u8])] = &[
    (
        "job.toml",
        include_bytes!("../../../examples/hyperparam/job.toml"),
    ),
    (
        "train.wasm",
        include_bytes!("../../../examples/hyperparam/train.wasm"),
    ),
    (
        "digits.csv",
        include_bytes!("../../../examples/hyperparam/digits.csv"),
    ),
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Local nodes to start (default: the number of cores).
    #[arg(long)]
    nodes: Option<u32>,
    /// Directory for the domain's database, the nodes and the report (default: a fresh
    /// temporary directory, kept so the report stays readable).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print one JSON object as the last stdout line.
    #[arg(long)]
    json: bool,
}

/// One trial's outcome.
struct Trial {
    params: BTreeMap<String, Value>,
    accuracy: f64,
    loss: f64,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let nodes = args
        .nodes
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
    if nodes == 0 || nodes > 64 {
        bail!("--nodes must be 1..=64, not {nodes}");
    }
    let dir = match &args.data {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => tempfile::Builder::new()
            .prefix("stardust-demo-")
            .tempdir()?
            .keep(),
    };
    let example = dir.join("example");
    std::fs::create_dir_all(&example)?;
    for (name, bytes) in EXAMPLE {
        std::fs::write(example.join(name), bytes)?;
    }
    let say = |line: &str| {
        if !args.json {
            eprintln!("{line}");
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(run(&dir, &example, nodes, &say))?;
    let elapsed = started.elapsed().as_secs_f64();
    let report = dir.join("report.html");
    std::fs::write(&report, html(&outcome, elapsed))
        .with_context(|| format!("cannot write {}", report.display()))?;
    let summary = summarize(&outcome, elapsed, &report);
    if args.json {
        println!("{summary}");
    } else {
        print!("{}", text(&outcome, &summary));
    }
    Ok(
        if summary["ledger_ok"] == true && summary["tasks_verified"] == summary["tasks_total"] {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// What the demo observed.
struct Outcome {
    job: Value,
    trials: Vec<Trial>,
    nodes: Vec<Value>,
    ledger: Value,
    replicas_run: u64,
    single_replica: u64,
    max_cost: u64,
    price_per_scu: u64,
}

async fn run(
    dir: &Path,
    example: &Path,
    nodes: u32,
    say: &dyn Fn(&str),
) -> anyhow::Result<Outcome> {
    let domain_dir = dir.join("domain");
    std::fs::create_dir_all(&domain_dir)?;
    let domain_key = stardust_keystore::load_or_create(&domain_dir.join("domain.key"))?;
    let domain_id = domain_key.id();
    let mut config = stardust_domain::Config::new(domain_dir.clone());
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.heartbeat_ms = 1_000;
    config.welcome_grant = 100_000 * stardust_ledger::MICRO_PER_CREDIT;
    let domain = stardust_domain::Domain::start(config, domain_key).await?;
    let url = format!("http://{}", domain.addr());
    say(&format!(
        "domain {} on {url} (SQLite in {})",
        domain_id.short(),
        domain_dir.display()
    ));

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    for i in 0..nodes {
        let data = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&data)?;
        let key = stardust_keystore::load_or_create(&data.join("node.key"))?;
        let mut c = stardust_node::Config::new(url.clone(), data);
        c.slots = 1;
        c.bench = false;
        handles.push(tokio::spawn(stardust_node::run(c, key, stopped.clone())));
    }
    let result = drive(&url, dir, example, nodes, say).await;
    let _ = stop.send(true);
    for h in handles {
        match tokio::time::timeout(Duration::from_secs(30), h).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "a demo node stopped with an error"),
            _ => tracing::warn!("a demo node did not stop in time"),
        }
    }
    domain.shutdown().await;
    let mut outcome = result?;
    // Audit the ledger from the database, after everything stopped.
    let store = stardust_domain::store::Store::open_sqlite(&domain_dir).await?;
    outcome.ledger = crate::ledger::audit(&store, domain_id).await?;
    Ok(outcome)
}

async fn drive(
    url: &str,
    dir: &Path,
    example: &Path,
    nodes: u32,
    say: &dyn Fn(&str),
) -> anyhow::Result<Outcome> {
    let client = stardust_sdk::Client::new(
        url,
        stardust_keystore::load_or_create(&dir.join("client.key"))?,
    )?;
    let t0 = Instant::now();
    loop {
        let list = client.nodes().await?;
        let online = list["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["state"] == "online").count());
        if online as u32 >= nodes {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("only {online} of {nodes} nodes connected");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say(&format!("{nodes} nodes connected"));
    let loaded = crate::jobfile::load(&example.join("job.toml"))?;
    for (_, bytes) in loaded.uploads {
        client.put_blob(bytes).await?;
    }
    let quote = client.quote(&loaded.spec).await?;
    let job = client.submit(&loaded.spec).await?;
    say(&format!(
        "submitted job {job}: {} trials × {} replicas of examples/hyperparam (MLP on UCI digits), {} credits per SCU, at most {} credits held in escrow",
        quote["tasks"],
        quote["redundancy"],
        credits(quote["price_per_scu"].as_i64().unwrap_or(0).into()),
        credits(quote["max_cost"].as_i64().unwrap_or(0).into())
    ));
    let status = client.wait(job, crate::client::progress).await?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    let results = client.results(job).await?;
    let tasks = client.tasks(job, 0, 10_000).await?;
    let mut trials = Vec::new();
    for r in results["results"].as_array().into_iter().flatten() {
        let Some(text) = r["output_text"].as_str() else {
            continue;
        };
        let Ok(metrics) = serde_json::from_str::<Value>(text.trim()) else {
            continue;
        };
        let mut params = BTreeMap::new();
        for k in ["lr", "hidden", "l2"] {
            params.insert(k.to_string(), metrics[k].clone());
        }
        trials.push(Trial {
            params,
            accuracy: metrics["val_accuracy"].as_f64().unwrap_or(0.0),
            loss: metrics["val_loss"].as_f64().unwrap_or(0.0),
        });
    }
    trials.sort_by(|a, b| {
        b.accuracy
            .total_cmp(&a.accuracy)
            .then(a.loss.total_cmp(&b.loss))
    });
    let replicas: Vec<u64> = tasks["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["replicas"].as_u64())
        .collect();
    let nodes_now = client.nodes().await?;
    Ok(Outcome {
        job: status,
        trials,
        nodes: nodes_now["nodes"].as_array().cloned().unwrap_or_default(),
        ledger: Value::Null,
        replicas_run: replicas.iter().sum(),
        single_replica: replicas.iter().filter(|r| **r == 1).count() as u64,
        max_cost: quote["max_cost"].as_u64().unwrap_or(0),
        price_per_scu: quote["price_per_scu"].as_u64().unwrap_or(0),
    })
}

fn summarize(o: &Outcome, elapsed: f64, report: &Path) -> Value {
    let operator = |id: &str| -> i64 {
        o.ledger["balances"][format!("operator:{id}")]
            .as_i64()
            .unwrap_or(0)
    };
    let nodes: Vec<Value> = o
        .nodes
        .iter()
        .map(|n| {
            let id = n["id"].as_str().unwrap_or_default();
            json!({
                "id": id,
                "tasks": n["agreed"].as_u64().unwrap_or(0) + n["disagreed"].as_u64().unwrap_or(0),
                "credits": operator(id) as f64 / 1e6,
                "micro_credits": operator(id),
                "reputation": n["reputation"],
                "spot_checks_passed": n["spot_passed"],
            })
        })
        .collect();
    let best = o.trials.first().map_or(
        Value::Null,
        |t| json!({ "params": t.params, "accuracy": t.accuracy, "loss": t.loss }),
    );
    let disagreements: u64 = o.nodes.iter().filter_map(|n| n["disagreed"].as_u64()).sum();
    let spot: u64 = o
        .nodes
        .iter()
        .filter_map(|n| n["spot_passed"].as_u64())
        .sum();
    let spot_failed: u64 = o
        .nodes
        .iter()
        .filter_map(|n| n["spot_failed"].as_u64())
        .sum();
    json!({
        "job_id": o.job["job_id"],
        "tasks_total": o.job["tasks_total"],
        "tasks_verified": o.job["tasks_verified"],
        "tasks_failed": o.job["tasks_failed"],
        "best": best,
        "nodes": nodes,
        "verification": {
            "redundancy": o.job["redundancy"],
            "replicas_run": o.replicas_run,
            "single_replica_tasks": o.single_replica,
            "disagreements": disagreements,
            "spot_checks_passed": spot,
            "spot_checks_failed": spot_failed,
        },
        "price_per_scu": o.price_per_scu,
        "escrow_max": o.max_cost,
        "ledger_ok": o.ledger["ok"] == true,
        "ledger": {
            "events": o.ledger["events"],
            "tasks_paid": o.ledger["tasks_paid"],
            "minted": o.ledger["minted"],
            "treasury": o.ledger["treasury"],
            "error": o.ledger["error"],
        },
        "elapsed_s": (elapsed * 100.0).round() / 100.0,
        "report": report.display().to_string(),
    })
}

fn params_text(p: &BTreeMap<String, Value>) -> String {
    p.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn text(o: &Outcome, s: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nLeaderboard (validation accuracy, 360 held-out digits):"
    );
    for (i, t) in o.trials.iter().take(10).enumerate() {
        let _ = writeln!(
            out,
            "  {:>2}. {:.2} %  loss {:.4}  {}",
            i + 1,
            100.0 * t.accuracy,
            t.loss,
            params_text(&t.params)
        );
    }
    if let Some(best) = o.trials.first() {
        let _ = writeln!(
            out,
            "\nBest: {} → {:.2} % validation accuracy",
            params_text(&best.params),
            100.0 * best.accuracy
        );
    }
    let v = &s["verification"];
    let _ = writeln!(
        out,
        "\nVerification: {}/{} tasks verified, {} failed; {} replicas run for redundancy {} ({} tasks ran as a single replica on nodes with a long agreeing record); {} disagreements; spot checks {} passed, {} failed",
        s["tasks_verified"],
        s["tasks_total"],
        s["tasks_failed"],
        v["replicas_run"],
        v["redundancy"],
        v["single_replica_tasks"],
        v["disagreements"],
        v["spot_checks_passed"],
        v["spot_checks_failed"]
    );
    let _ = writeln!(
        out,
        "\nCredits earned (settlement 80 % + contribution bonus):"
    );
    for n in s["nodes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  node {}  {:>3} tasks  {:>14} credits  reputation {:.3}",
            n["id"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(10)
                .collect::<String>(),
            n["tasks"],
            credits(n["micro_credits"].as_i64().unwrap_or(0).into()),
            n["reputation"].as_f64().unwrap_or(0.0)
        );
    }
    let l = &s["ledger"];
    if s["ledger_ok"] == true {
        let _ = writeln!(
            out,
            "\nLedger: OK — {} hash-chained events re-verified (every link, every signature); {} tasks paid once each",
            l["events"], l["tasks_paid"]
        );
    } else {
        let _ = writeln!(out, "\nLedger: FAILED — {}", l["error"]);
    }
    let _ = writeln!(
        out,
        "Elapsed: {:.1} s\nReport: {}",
        s["elapsed_s"].as_f64().unwrap_or(0.0),
        s["report"].as_str().unwrap_or("")
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An HTML page with an SVG plot: validation accuracy against the learning rate (log
/// scale), one colour per hidden size, point size growing with the L2 penalty.
fn html(o: &Outcome, elapsed: f64) -> String {
    let (w, h, pad) = (720.0, 420.0, 56.0);
    let lrs: Vec<f64> = o
        .trials
        .iter()
        .filter_map(|t| t.params.get("lr").and_then(Value::as_f64))
        .filter(|v| *v > 0.0)
        .collect();
    let (lo, hi) = lrs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let (lo, hi) = if lo < hi {
        (lo.log10() - 0.15, hi.log10() + 0.15)
    } else {
        (-3.0, 0.0)
    };
    let x = |lr: f64| pad + (lr.log10() - lo) / (hi - lo) * (w - 2.0 * pad);
    let y = |acc: f64| h - pad - acc * (h - 2.0 * pad);
    let colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"];
    let mut hidden: Vec<i64> = o
        .trials
        .iter()
        .filter_map(|t| t.params.get("hidden").and_then(Value::as_i64))
        .collect();
    hidden.sort_unstable();
    hidden.dedup();
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="validation accuracy by learning rate">
<rect width="100%" height="100%" fill="#fff"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#333"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#333"/>
<text x="{cx}" y="{tb}" text-anchor="middle" font-size="13">learning rate (log scale)</text>
<text x="14" y="{cy}" font-size="13" transform="rotate(-90 14 {cy})" text-anchor="middle">validation accuracy</text>
"##,
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        tb = h - 14.0,
        cy = h / 2.0
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = write!(
            svg,
            r##"<line x1="{pad}" y1="{yy}" x2="{r}" y2="{yy}" stroke="#eee"/><text x="{tx}" y="{ty}" font-size="11" text-anchor="end">{tick:.2}</text>"##,
            yy = y(tick),
            r = w - pad,
            tx = pad - 6.0,
            ty = y(tick) + 4.0
        );
    }
    let mut seen_lr: Vec<f64> = lrs.clone();
    seen_lr.sort_by(f64::total_cmp);
    seen_lr.dedup();
    for lr in seen_lr {
        let _ = write!(
            svg,
            r##"<text x="{xx}" y="{ty}" font-size="11" text-anchor="middle">{lr}</text>"##,
            xx = x(lr),
            ty = h - pad + 16.0
        );
    }
    for t in &o.trials {
        let (Some(lr), Some(hd)) = (
            t.params.get("lr").and_then(Value::as_f64),
            t.params.get("hidden").and_then(Value::as_i64),
        ) else {
            continue;
        };
        let l2 = t.params.get("l2").and_then(Value::as_f64).unwrap_or(0.0);
        let c = colors[hidden.iter().position(|v| *v == hd).unwrap_or(0) % colors.len()];
        let jitter = (hidden.iter().position(|v| *v == hd).unwrap_or(0) as f64 - 1.0) * 7.0;
        let radius = 3.0 + 1.5 * (l2 * 1e4).max(1.0).log10();
        let _ = write!(
            svg,
            r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="{radius:.1}" fill="{c}" fill-opacity="0.75"><title>{} → {:.2} %</title></circle>"##,
            escape(&params_text(&t.params)),
            100.0 * t.accuracy,
            cx = x(lr) + jitter,
            cy = y(t.accuracy)
        );
    }
    for (i, hd) in hidden.iter().enumerate() {
        let _ = write!(
            svg,
            r##"<circle cx="{lx}" cy="{ly}" r="5" fill="{c}"/><text x="{tx}" y="{ty}" font-size="12">hidden {hd}</text>"##,
            lx = w - pad - 90.0,
            ly = pad + 8.0 + 18.0 * i as f64,
            tx = w - pad - 80.0,
            ty = pad + 12.0 + 18.0 * i as f64,
            c = colors[i % colors.len()]
        );
    }
    svg.push_str("</svg>");
    let mut rows = String::new();
    for (i, t) in o.trials.iter().enumerate() {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{:.2} %</td><td>{:.4}</td></tr>",
            i + 1,
            escape(&params_text(&t.params)),
            100.0 * t.accuracy,
            t.loss
        );
    }
    format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Stardust demo: hyperparameter search</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}}table{{border-collapse:collapse}}td,th{{padding:.2rem .8rem;border-bottom:1px solid #ddd;text-align:left}}</style></head>
<body><h1>Hyperparameter search on Stardust</h1>
<p>Job {job}: {verified}/{total} trials verified by redundant execution, in {elapsed:.1} s. MLP trained by SGD on the UCI optical handwritten digits; validation on 360 held-out images. Ledger check: {ledger}.</p>
{svg}
<p>Point size grows with the L2 penalty.</p>
<h2>All trials</h2><table><tr><th>#</th><th>parameters</th><th>validation accuracy</th><th>validation loss</th></tr>{rows}</table>
</body></html>
"##,
        job = o.job["job_id"],
        verified = o.job["tasks_verified"],
        total = o.job["tasks_total"],
        ledger = if o.ledger["ok"] == true {
            "OK"
        } else {
            "FAILED"
        },
    )
}
