//! `stardust bench ...`: performance measurements. Targets live here and in
//! docs/benchmarks.md, never in timed tests.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use stardust_proto::task::{Limits, MAX_SAFE_INTEGER, Status};
use stardust_sandbox::{Config, Sandbox, Task};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Sandbox speed: instantiate+run of a trivial module, and metered wasm vs native time
    /// for C kernels (each built natively and to wasm from the same source).
    Sandbox {
        /// Directory of kernel sources and their committed .wasm.
        #[arg(long, default_value = "benchmarks/kernels")]
        kernels: PathBuf,
        /// A few seconds of smaller inputs (the CI smoke run).
        #[arg(long)]
        quick: bool,
        /// Print one JSON object as the last stdout line.
        #[arg(long)]
        json: bool,
    },
    /// Trivial tasks through the whole lifecycle (dispatch, sandboxed run, signed result,
    /// verification, durable state) on node processes: tasks/s and submit→verified latency.
    Throughput(throughput::Args),
    /// Many simulated nodes (real keys, signatures and protocol over loopback) against one
    /// coordinator process: connect time, coordinator RSS and CPU, heartbeat handling, tasks
    /// served, dashboard snapshot time.
    Scale(crate::scale::Args),
    /// What a single-task round trip must spend on this machine before any of its own work:
    /// the signatures, verifications, commit and loopback hops on its critical path, each
    /// measured here, and their sum; then round trips of the real client and a real node
    /// through a bare domain that makes only those steps.
    Floor(crate::floor::Args),
    /// One simulator process of `bench scale` (internal).
    #[command(hide = true)]
    ScaleSim(crate::scale::SimArgs),
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Sandbox {
            kernels,
            quick,
            json,
        } => sandbox(&kernels, quick, json),
        Command::Throughput(args) => throughput::main(args),
        Command::Scale(args) => crate::scale::main(args),
        Command::Floor(args) => crate::floor::main(args),
        Command::ScaleSim(args) => crate::scale::sim(args),
    }
}

/// The benchmarks' trivial task: a module that does nothing, so that what is measured is
/// the lifecycle around it.
pub(crate) fn trivial_module() -> anyhow::Result<Vec<u8>> {
    Ok(wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "_start")))"#,
    )?)
}

/// The limits the benchmarks' trivial tasks are submitted with.
pub(crate) fn trivial_limits() -> serde_json::Value {
    serde_json::json!({"fuel": 1_000_000, "memory_bytes": 1 << 20, "wall_ms": 10_000, "output_bytes": 1024})
}

/// Set by `stardust bench` on the processes it starts, to its own process id: they exit
/// when their parent is no longer that process (the bench is gone, even killed by a signal
/// that left it no time to reap them; [`Kill`] covers every other way out).
pub const EXIT_WITH_PARENT: &str = "STARDUST_EXIT_WITH_PARENT";

/// The value of [`EXIT_WITH_PARENT`] for this process's children.
pub fn parent_marker() -> String {
    std::process::id().to_string()
}

/// With [`EXIT_WITH_PARENT`] set, exits as soon as this process's parent is not the process
/// it names (checked now, then twice a second).
pub fn exit_with_parent() {
    let Some(expected) = std::env::var(EXIT_WITH_PARENT)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    else {
        return;
    };
    let orphaned = move || std::os::unix::process::parent_id() != expected;
    let leave = || {
        eprintln!("stardust: the process that started this one is gone; exiting");
        std::process::exit(1);
    };
    if orphaned() {
        leave();
    }
    let watch = move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            if orphaned() {
                leave();
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(watch)
    {
        eprintln!("stardust: cannot watch the parent process: {e}");
    }
}

/// Child processes killed (and reaped) when dropped, so a failed benchmark leaves nothing
/// running.
pub(crate) struct Kill(pub Vec<std::process::Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// (kernel, full-size args, quick args)
const KERNELS: [(&str, &[&str], &[&str]); 4] = [
    ("matmul", &["256", "30"], &["96", "3"]),
    ("sieve", &["4000000", "30"], &["200000", "3"]),
    ("hash", &["1048576", "300"], &["65536", "10"]),
    ("nbody", &["5000000"], &["100000"]),
];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A C compiler for native builds: zig's clang (the same LLVM that builds the wasm), else `cc`.
fn native_compiler() -> (Vec<String>, &'static str) {
    let zig = std::process::Command::new("python3")
        .args(["-m", "ziglang", "version"])
        .output();
    if zig.is_ok_and(|o| o.status.success()) {
        (
            vec!["python3".into(), "-m".into(), "ziglang".into(), "cc".into()],
            "zig cc",
        )
    } else {
        (vec!["cc".into()], "cc")
    }
}

fn sandbox(kernels: &Path, quick: bool, json: bool) -> anyhow::Result<ExitCode> {
    let sandbox = Sandbox::new(Config {
        max_instances: 4,
        ..Config::default()
    })?;
    let limits = Limits {
        fuel: MAX_SAFE_INTEGER,
        memory_bytes: 512 << 20,
        wall_ms: 600_000,
        output_bytes: 1 << 20,
    };

    // 1. Instantiate + run a trivial module, pooled.
    let trivial = trivial_module()?;
    let prepared = sandbox.load(&stardust_meter::instrument(&trivial)?)?;
    let empty: Arc<[u8]> = Arc::from(&b""[..]);
    let task = Task {
        input: empty.clone(),
        args: &[],
        seed: 0,
        limits,
    };
    let n = if quick { 2_000 } else { 50_000 };
    for _ in 0..n / 10 {
        sandbox.run(&prepared, &task);
    }
    let mut times = Vec::with_capacity(n);
    let all = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let out = sandbox.run(&prepared, &task);
        times.push(t.elapsed());
        if out.report.status != Status::Ok {
            bail!("trivial module failed: {:?}", out.report);
        }
    }
    let mean_us = all.elapsed().as_secs_f64() * 1e6 / n as f64;
    times.sort_unstable();
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));

    // 2. Kernels: metered wasm vs native.
    let (cc, cc_name) = native_compiler();
    let build = tempfile::tempdir()?;
    let reps = if quick { 1 } else { 3 };
    let mut rows = Vec::new();
    for (name, full, small) in KERNELS {
        let args: Vec<String> = (if quick { small } else { full })
            .iter()
            .map(|s| s.to_string())
            .collect();
        let src = kernels.join(format!("{name}.c"));
        let wasm_path = kernels.join(format!("{name}.wasm"));
        let wasm = std::fs::read(&wasm_path).with_context(|| {
            format!(
                "cannot read {} (run from the repository root, or pass --kernels)",
                wasm_path.display()
            )
        })?;
        let native = build.path().join(name);
        let status = std::process::Command::new(&cc[0])
            .args(&cc[1..])
            .args(["-O2", "-o"])
            .arg(&native)
            .arg(&src)
            .arg("-lm")
            .status()
            .with_context(|| format!("cannot run {cc_name}"))?;
        if !status.success() {
            bail!("{cc_name} failed to build {}", src.display());
        }
        let mut native_best = Duration::MAX;
        let mut native_out = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let out = std::process::Command::new(&native).args(&args).output()?;
            native_best = native_best.min(t.elapsed());
            native_out = out.stdout;
        }
        let prepared = sandbox.load(&stardust_meter::instrument(&wasm)?)?;
        let task = Task {
            input: empty.clone(),
            args: &args,
            seed: 0,
            limits,
        };
        let mut wasm_best = Duration::MAX;
        let mut fuel = 0;
        for _ in 0..reps {
            let t = Instant::now();
            let out = sandbox.run(&prepared, &task);
            wasm_best = wasm_best.min(t.elapsed());
            if out.report.status != Status::Ok {
                bail!("kernel {name} failed in the sandbox: {:?}", out.report);
            }
            if out.output != native_out {
                bail!("kernel {name}: wasm and native outputs differ");
            }
            fuel = out.report.fuel_used;
        }
        let ratio = wasm_best.as_secs_f64() / native_best.as_secs_f64();
        rows.push((name, native_best, wasm_best, ratio, fuel));
    }
    let geomean = (rows.iter().map(|r| r.3.ln()).sum::<f64>() / rows.len() as f64).exp();

    if !json {
        println!(
            "trivial module, instantiate+run ({n} runs, pooled): mean {mean_us:.1} µs, p50 {:.1} µs, p99 {:.1} µs",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
        println!("kernels (native: {cc_name} -O2; wasm: metered, best of {reps}):");
        println!(
            "  {:<8} {:>11} {:>11} {:>7} {:>16}",
            "kernel", "native ms", "wasm ms", "ratio", "fuel"
        );
        for (name, nat, w, ratio, fuel) in &rows {
            println!(
                "  {name:<8} {:>11.1} {:>11.1} {ratio:>6.2}x {fuel:>16}",
                nat.as_secs_f64() * 1e3,
                w.as_secs_f64() * 1e3
            );
        }
        println!("  geometric mean ratio: {geomean:.2}x");
    }
    let kernels: Vec<_> = rows
        .iter()
        .map(|(name, nat, w, ratio, fuel)| {
            serde_json::json!({"name": name, "native_ms": nat.as_secs_f64() * 1e3, "wasm_ms": w.as_secs_f64() * 1e3, "ratio": ratio, "fuel": fuel})
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "trivial": {"runs": n, "mean_us": mean_us, "p50_us": p50.as_secs_f64() * 1e6, "p99_us": p99.as_secs_f64() * 1e6},
                "native_compiler": cc_name,
                "kernels": kernels,
                "geomean_ratio": geomean,
                "quick": quick,
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `stardust bench throughput`: N trivial tasks through the whole lifecycle.
pub mod throughput {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context as _, bail};
    use serde_json::{Value, json};

    /// Options.
    #[derive(Debug, clap::Args)]
    pub struct Args {
        /// Tasks in the job (throughput mode) or round trips (latency mode).
        #[arg(long, default_value_t = 1000)]
        tasks: u32,
        /// Node processes.
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Slots per node.
        #[arg(long, default_value_t = 2)]
        slots: u32,
        /// Replicas per task.
        #[arg(long, default_value_t = 1)]
        redundancy: u8,
        /// One single-task job at a time: submit → verified round trips.
        #[arg(long)]
        latency: bool,
        /// Keep every task at its full redundancy (no adaptive replication).
        #[arg(long)]
        fixed_replication: bool,
        /// Tasks of a first, unmeasured job that lets reputations settle.
        #[arg(long, default_value_t = 0)]
        warmup: u32,
        /// Processor cores the domain runs on, as `stardust domain --cores` takes them.
        #[arg(long, default_value = "auto")]
        cores: stardust_domain::Cores,
        /// Print one JSON object as the last stdout line.
        #[arg(long)]
        json: bool,
    }

    use super::Kill;

    fn percentile(sorted: &[f64], p: f64) -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
    }

    pub fn main(args: Args) -> anyhow::Result<std::process::ExitCode> {
        if args.tasks == 0
            || args.nodes == 0
            || args.redundancy == 0
            || u32::from(args.redundancy) > args.nodes
        {
            bail!("need --tasks ≥ 1, --nodes ≥ 1 and 1 ≤ --redundancy ≤ --nodes");
        }
        let dir = tempfile::tempdir()?;
        // The client: one thread, as a load generator (and the peers' clients) run. The
        // domain runs on a runtime of its own.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut config = stardust_domain::Config::new(dir.path().join("domain"));
            config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            config.heartbeat_ms = 500;
            config.cores = args.cores;
            // The benchmark's client pays for its tasks like any other.
            config.welcome_grant = 1_000_000_000_000_000;
            let unlimited = stardust_domain::Rate { per_s: 1e9, burst: 1e9 };
            config.rate_per_key = unlimited;
            config.rate_per_addr = unlimited;
            let identity = stardust_keystore::generate()?;
            let domain = stardust_domain::Domain::start(config, identity).await?;
            let url = format!("http://{}", domain.addr());
            let exe = std::env::current_exe()?;
            let mut children = Kill(Vec::new());
            for i in 0..args.nodes {
                let child = Command::new(&exe)
                    .env(crate::bench::EXIT_WITH_PARENT, crate::bench::parent_marker())
                    .args(["node", "--domain", &url, "--slots", &args.slots.to_string(), "--no-bench", "--data"])
                    .arg(dir.path().join(format!("node{i}")))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("cannot start a node process")?;
                children.0.push(child);
            }
            let client = stardust_sdk::Client::new(&url, stardust_keystore::generate()?)?;
            let started = Instant::now();
            loop {
                let nodes = client.nodes().await?;
                let online = nodes["nodes"].as_array().map_or(0, |n| n.iter().filter(|n| n["state"] == "online").count());
                if online as u32 >= args.nodes {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    bail!("only {online} of {} nodes connected", args.nodes);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let module = super::trivial_module()?;
            let module = client.put_blob(module).await?;
            let input = client.put_blob(Vec::new()).await?;
            let spec = |n: u32| -> anyhow::Result<stardust_proto::job::JobSpec> {
                Ok(serde_json::from_value(json!({
                    "module": module.to_string(),
                    "input": input.to_string(),
                    "args": ["{i}"],
                    "redundancy": args.redundancy,
                    "adaptive": !args.fixed_replication,
                    "limits": super::trivial_limits(),
                    "sweep": {"grid": {"i": (0..n).collect::<Vec<_>>()}},
                }))?)
            };
            if args.warmup > 0 {
                let job = client.submit(&spec(args.warmup)?).await?;
                client.wait(job, |_| {}).await?;
            }
            let mut replicas_run = 0u64;
            let (tasks_per_s, mut latencies, elapsed) = if args.latency {
                let mut lat = Vec::new();
                // The same one-task job each time, described once: what is timed is its
                // submission, run, verification and answer, not building its description.
                let one = spec(1)?;
                let t0 = Instant::now();
                for _ in 0..args.tasks {
                    // Submitted, verified, and its output back: one request.
                    let t = Instant::now();
                    let answer = client.submit_wait(&one, 60_000).await?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    if answer["results"][0]["output_text"].as_str().is_none() {
                        bail!("a round trip did not come back with its verified output: {answer}");
                    }
                }
                let e = t0.elapsed().as_secs_f64();
                (f64::from(args.tasks) / e, lat, e)
            } else {
                let t0 = Instant::now();
                let job = client.submit(&spec(args.tasks)?).await?;
                let status = client.wait(job, |_| {}).await?;
                let e = t0.elapsed().as_secs_f64();
                if status["tasks_verified"].as_u64() != Some(u64::from(args.tasks)) {
                    bail!("not every task was verified: {status}");
                }
                let created = status["created_ms"].as_i64().unwrap_or(0);
                let mut all = Vec::new();
                while (all.len() as u32) < args.tasks {
                    let page = client.tasks(job, all.len() as u32, 10_000).await?;
                    let page = page["tasks"].as_array().cloned().unwrap_or_default();
                    if page.is_empty() {
                        break;
                    }
                    all.extend(page);
                }
                let lat: Vec<f64> = all
                    .iter()
                    .filter_map(|t| t["finished_ms"].as_i64())
                    .map(|f| (f - created) as f64)
                    .collect();
                replicas_run = all.iter().filter_map(|t| t["replicas"].as_u64()).sum();
                (f64::from(args.tasks) / e, lat, e)
            };
            latencies.sort_by(f64::total_cmp);
            let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
            drop(children);
            domain.shutdown().await;
            let result: Value = json!({
                "mode": if args.latency { "latency" } else { "throughput" },
                "tasks": args.tasks,
                "nodes": args.nodes,
                "slots": args.slots,
                "redundancy": args.redundancy,
                "tasks_per_s": tasks_per_s,
                "p50_ms": p50,
                "p99_ms": p99,
                "elapsed_s": elapsed,
                "adaptive": !args.fixed_replication,
                "cores": args.cores.to_string(),
                "replicas_per_task": replicas_run as f64 / f64::from(args.tasks),
                "verification_overhead": replicas_run as f64 / f64::from(args.tasks) - 1.0,
            });
            if args.json {
                println!("{result}");
            } else {
                println!(
                    "{} tasks on {} nodes × {} slots, redundancy {}: {tasks_per_s:.0} tasks/s, submit→verified p50 {p50:.1} ms, p99 {p99:.1} ms ({elapsed:.2} s)",
                    args.tasks, args.nodes, args.slots, args.redundancy
                );
                if !args.latency {
                    println!(
                        "replicas run per verified task: {:.3} (verification overhead {:.1} %, {})",
                        result["replicas_per_task"].as_f64().unwrap_or(0.0),
                        100.0 * result["verification_overhead"].as_f64().unwrap_or(0.0),
                        if args.fixed_replication { "fixed replication" } else { "adaptive replication" }
                    );
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        })
    }
}
