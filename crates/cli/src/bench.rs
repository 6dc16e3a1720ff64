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
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Sandbox {
            kernels,
            quick,
            json,
        } => sandbox(&kernels, quick, json),
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
    let trivial =
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)?;
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
