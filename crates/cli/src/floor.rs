//! `stardust bench floor`: what one round trip of the protocol must spend on this machine
//! before any of its own work, from the costs of its unavoidable steps measured here.
//!
//! A single-task round trip (`bench throughput --latency`) has, on its critical path, with
//! the job leased at its submission and its assignment sent ahead of the job's commit:
//!
//! - 4 Ed25519 signatures: the client's request, the domain's assignment, the node's result
//!   frame, the ledger record that settles the task;
//! - 3 strict verifications: the request, the assignment (by the node), the result frame;
//! - 1 durable commit: the result, its verification and its settlement (the job's own commit
//!   overlaps the node's run);
//! - 4 one-way loopback hops between three processes: client → domain → node → domain →
//!   client.
//!
//! Each is measured with the code the domain, node and client use (the store's SQLite in
//! its configuration, `Identity::sign`, `NodeId::verify`), and the floor is their sum. The
//! statements, JSON, HTTP and the sandbox run come on top.
//!
//! Then the same path is measured whole, through processes: round trips of the real client
//! and a real node process through a bare domain ([`crate::bare`]) that makes those steps
//! and one durable commit, over the domain's HTTP and WebSocket stack, and nothing else.
//! Its p50 is what any domain's round trip on this machine stays above.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use stardust_proto::content::ContentId;
use stardust_proto::identity::Identity;

/// The round trip target of the Benchmarks issue, µs.
const TARGET_US: f64 = 500.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measurements of each step (the median is reported).
    #[arg(long, default_value_t = 2000)]
    iterations: u32,
    /// Round trips through the bare domain (0: none).
    #[arg(long, default_value_t = 2000)]
    round_trips: u32,
    /// Processor cores the bare domain runs on, as `stardust domain --cores` takes them.
    #[arg(long, default_value = "auto")]
    cores: stardust_domain::Cores,
    /// Print one JSON object as the last stdout line.
    #[arg(long)]
    json: bool,
}

/// The steps on the critical path and how many times each is made.
const PATH: [(&str, u32); 4] = [("sign", 4), ("verify", 3), ("commit", 1), ("hop", 4)];

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let n = args.iterations.clamp(10, 1_000_000) as usize;
    let sign = median(sign_times(n));
    let verify = median(verify_times(n));
    let commit = median(commit_times(n)?);
    let hop = median(hop_times(n)?);
    let each = [sign, verify, commit, hop];
    let floor: f64 = PATH
        .iter()
        .zip(each)
        .map(|((_, times), us)| f64::from(*times) * us)
        .sum();
    let bare = if args.round_trips > 0 {
        let mut us =
            crate::bare::round_trips(args.round_trips.min(1_000_000) as usize, args.cores)?;
        us.sort_by(f64::total_cmp);
        Some((us[us.len() / 2], us[(us.len() - 1) * 99 / 100]))
    } else {
        None
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "iterations": n,
                "sign_us": sign,
                "verify_us": verify,
                "commit_us": commit,
                "hop_us": hop,
                "path": PATH.iter().map(|(s, t)| serde_json::json!({"step": s, "times": t})).collect::<Vec<_>>(),
                "floor_us": floor,
                "target_us": TARGET_US,
                "round_trips": args.round_trips,
                "bare_p50_us": bare.map(|b| b.0),
                "bare_p99_us": bare.map(|b| b.1),
                "cores": args.cores.to_string(),
            })
        );
    } else {
        println!("steps on a single-task round trip's critical path (medians of {n}):");
        for ((step, times), us) in PATH.iter().zip(each) {
            println!(
                "  {step:<7} {us:>8.1} µs × {times} = {:>7.1} µs",
                f64::from(*times) * us
            );
        }
        println!(
            "floor {floor:.0} µs before any statement, JSON, HTTP or sandbox run (target {TARGET_US:.0} µs)"
        );
        if let Some((p50, p99)) = bare {
            println!(
                "{} round trips through a bare domain (these steps, HTTP, WebSocket, the node's sandbox run; no job, lease or ledger): p50 {p50:.0} µs, p99 {p99:.0} µs (target {TARGET_US:.0} µs)",
                args.round_trips
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn median(mut us: Vec<f64>) -> f64 {
    us.sort_by(f64::total_cmp);
    us[us.len() / 2]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A message of an assignment frame's size.
fn message(i: usize) -> Vec<u8> {
    let mut m = vec![0u8; 400];
    m[..8].copy_from_slice(&(i as u64).to_le_bytes());
    m
}

fn sign_times(n: usize) -> Vec<f64> {
    let key = Identity::from_secret_bytes(&[1; 32]);
    (0..n)
        .map(|i| {
            let m = message(i);
            let t = Instant::now();
            std::hint::black_box(key.sign(&m));
            micros(t.elapsed())
        })
        .collect()
}

fn verify_times(n: usize) -> Vec<f64> {
    let key = Identity::from_secret_bytes(&[2; 32]);
    let id = key.id();
    (0..n)
        .map(|i| {
            let m = message(i);
            let sig = key.sign(&m);
            let t = Instant::now();
            let ok = id.verify(&m, &sig).is_ok();
            let us = micros(t.elapsed());
            assert!(ok, "a fresh signature verifies");
            us
        })
        .collect()
}

/// One small row committed through the domain's store (SQLite, its pragmas): the least a
/// durable step can cost.
fn commit_times(n: usize) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime")?;
    rt.block_on(async {
        let store = stardust_domain::store::Store::open_sqlite(dir.path())
            .await
            .context("opening SQLite")?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let bytes = message(i);
            let id = ContentId::of(&bytes);
            let t = Instant::now();
            store
                .put_blob(id, &bytes, 0)
                .await
                .context("a one-row commit")?;
            out.push(micros(t.elapsed()));
        }
        Ok(out)
    })
}

/// Half a loopback TCP round trip between two threads (Nagle off, as every hop of the
/// protocol is).
fn hop_times(n: usize) -> anyhow::Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding loopback")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 64];
        loop {
            s.read_exact(&mut b)?;
            s.write_all(&b)?;
        }
    });
    let mut s = TcpStream::connect(addr).context("connecting on loopback")?;
    s.set_nodelay(true)?;
    let mut b = [7u8; 64];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        out.push(micros(t.elapsed()) / 2.0);
    }
    drop(s);
    let _ = echo.join();
    Ok(out)
}
