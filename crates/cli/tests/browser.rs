//! The browser node in a real headless Chromium (Debian's `chromium`, driven by npm
//! `playwright-core` from `web/tests/*.mjs`):
//!
//! - its WASI host (`web/contrib/contrib.js`) against the native sandbox, program by
//!   program: the same status, fuel, exit code and output hash, bit for bit;
//! - a real domain, a native node process and a browser tab with the script tag sharing a
//!   redundancy-2 job, then hostile modules;
//! - the same with the tab's session held by a connection gateway.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    Proc, browser_available, cli, free_port, root, start_domain, start_nodes, wait_until,
};
use serde_json::{Value, json};
use stardust_proto::content::ContentId;

/// `stardust run --json --save-metered`: the native report and the metered module's path.
fn native_run(
    dir: &Path,
    name: &str,
    module: &Path,
    input: Option<&Path>,
    args: &[&str],
    seed: u64,
    limits: &Value,
) -> (Value, PathBuf) {
    let metered = dir.join(format!("{name}.metered.wasm"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stardust"));
    cmd.arg("run")
        .arg(module)
        .args(["--json", "--seed", &seed.to_string()])
        .args(["--fuel", &limits["fuel"].to_string()])
        .args(["--memory", &limits["memory_bytes"].to_string()])
        .args(["--timeout", &format!("{}ms", limits["wall_ms"])])
        .args(["--max-output", &limits["output_bytes"].to_string()])
        .arg("--output")
        .arg(dir.join(format!("{name}.out")))
        .arg("--save-metered")
        .arg(&metered);
    if let Some(input) = input {
        cmd.arg("--input").arg(input);
    }
    let out = cmd
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("stardust run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{name}: {e}: {stdout}"));
    (report, metered)
}

/// (name, module, input, args, seed, limits, compare the full fingerprint)
type Case<'a> = (
    &'a str,
    PathBuf,
    Option<&'a Path>,
    Vec<&'a str>,
    u64,
    Value,
    bool,
);

fn limits(fuel: u64, memory: u64, wall_ms: u64, output: u64) -> Value {
    json!({ "fuel": fuel, "memory_bytes": memory, "wall_ms": wall_ms, "output_bytes": output })
}

#[test]
fn the_browser_host_matches_the_native_sandbox_bit_for_bit() {
    if !browser_available("browser host parity test") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let r = root();
    let tp = |n: &str| r.join("test-programs").join(n);
    let digits = r.join("examples/hyperparam/digits.csv");
    let hello_in = d.join("hello.in");
    std::fs::write(&hello_in, b"stdin is upper-cased\n").expect("input");
    let std_limits = limits(2_000_000_000, 64 << 20, 30_000, 1 << 20);
    let cases: Vec<Case<'_>> = vec![
        (
            "hello",
            tp("hello.wasm"),
            Some(&hello_in),
            vec!["a", "βeta"],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "clock_random",
            tp("clock_random.wasm"),
            None,
            vec![],
            7,
            std_limits.clone(),
            true,
        ),
        (
            "clock_random_seed_max",
            tp("clock_random.wasm"),
            None,
            vec![],
            u64::MAX,
            std_limits.clone(),
            true,
        ),
        (
            "exit_code",
            tp("exit_code.wasm"),
            None,
            vec![],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "divide_by_zero",
            tp("divide_by_zero.wasm"),
            None,
            vec![],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "escape",
            tp("escape.wasm"),
            None,
            vec![],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "output_flood",
            tp("output_flood.wasm"),
            None,
            vec![],
            0,
            limits(2_000_000_000, 64 << 20, 30_000, 5000),
            true,
        ),
        (
            "memory_bomb",
            tp("memory_bomb.wasm"),
            None,
            vec![],
            0,
            limits(2_000_000_000, 32 << 20, 30_000, 4096),
            true,
        ),
        (
            "infinite_loop_fuel",
            tp("infinite_loop.wasm"),
            None,
            vec![],
            0,
            limits(50_000_000, 32 << 20, 30_000, 4096),
            true,
        ),
        // The C programs start with 257 pages (16 MiB and 64 KiB).
        (
            "initial_memory_over_cap",
            tp("hello.wasm"),
            None,
            vec![],
            0,
            limits(2_000_000_000, 16 << 20, 30_000, 4096),
            true,
        ),
        (
            "busy",
            tp("busy.wasm"),
            None,
            vec!["200000", "tag"],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "nan",
            tp("nan.wat"),
            None,
            vec![],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "train",
            r.join("examples/hyperparam/train.wasm"),
            Some(&digits),
            vec!["0.03", "16", "0.0001", "2", "1"],
            3,
            std_limits.clone(),
            true,
        ),
        (
            "matmul",
            r.join("benchmarks/kernels/matmul.wasm"),
            None,
            vec!["24", "2"],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "nbody",
            r.join("benchmarks/kernels/nbody.wasm"),
            None,
            vec!["2000"],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "sieve",
            r.join("benchmarks/kernels/sieve.wasm"),
            None,
            vec!["20000", "2"],
            0,
            std_limits.clone(),
            true,
        ),
        (
            "hash",
            r.join("benchmarks/kernels/hash.wasm"),
            None,
            vec!["4096", "4"],
            0,
            std_limits.clone(),
            true,
        ),
        // Stack depth is engine-bound (protocol.md §7): the status must match, fuel need not.
        (
            "deep_recursion",
            tp("deep_recursion.wasm"),
            None,
            vec![],
            0,
            std_limits.clone(),
            false,
        ),
        // The browser ends a run at its deadline by terminating the worker.
        (
            "infinite_loop_deadline",
            tp("infinite_loop.wasm"),
            None,
            vec![],
            0,
            limits(stardust_proto::task::MAX_SAFE_INTEGER, 32 << 20, 3000, 4096),
            false,
        ),
    ];
    let mut natives = Vec::new();
    let mut manifest_cases = Vec::new();
    for (name, module, input, args, seed, l, _) in &cases {
        let (native, metered) = native_run(d, name, module, *input, args, *seed, l);
        manifest_cases.push(json!({
            "name": name, "module": metered, "input": input, "args": args,
            "seed": seed.to_string(), "limits": l,
        }));
        natives.push(native);
    }
    let hash_lengths = [
        0usize, 1, 64, 1023, 1024, 1025, 2048, 3073, 8193, 65_536, 300_001,
    ];
    let manifest = json!({
        "contrib": r.join("web/contrib/contrib.js"),
        "noble": r.join("web/contrib/vendor/noble-ed25519.js"),
        "hash_lengths": hash_lengths,
        "cases": manifest_cases,
    });
    let manifest_path = d.join("manifest.json");
    std::fs::write(&manifest_path, manifest.to_string()).expect("manifest");
    let out = Command::new("node")
        .arg(r.join("web/tests/parity.mjs"))
        .arg(&manifest_path)
        .stdin(Stdio::null())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "parity.mjs failed:\n{stdout}{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PARITY "))
        .unwrap_or_else(|| panic!("no PARITY line:\n{stdout}{stderr}"));
    let got: Value = serde_json::from_str(line).expect("parity json");

    for (i, (name, .., full)) in cases.iter().enumerate() {
        let (n, b) = (&natives[i], &got["reports"][i]);
        if *name == "infinite_loop_deadline" {
            assert_eq!(n["status"], "deadline_exceeded", "{name}: native {n}");
            assert_eq!(b["status"], "deadline_exceeded", "{name}: browser {b}");
            continue;
        }
        assert_eq!(b["status"], n["status"], "{name}: browser {b} native {n}");
        assert_eq!(b["trap"], n["trap"], "{name}: browser {b} native {n}");
        if *full {
            assert_eq!(
                b["exit_code"], n["exit_code"],
                "{name}: browser {b} native {n}"
            );
            assert_eq!(
                b["fuel_used"], n["fuel_used"],
                "{name}: browser {b} native {n}"
            );
            assert_eq!(
                b["output"], n["output_hash"],
                "{name}: browser {b} native {n}"
            );
            assert_eq!(
                b["output_len"], n["output_len"],
                "{name}: browser {b} native {n}"
            );
        }
    }
    // The cases cover what they claim to.
    let status = |name: &str| {
        let i = cases.iter().position(|c| c.0 == name).expect("case");
        natives[i]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(status("memory_bomb"), "out_of_memory");
    assert_eq!(status("infinite_loop_fuel"), "out_of_fuel");
    assert_eq!(status("output_flood"), "output_too_large");
    assert_eq!(status("exit_code"), "exit_nonzero");
    assert_eq!(status("initial_memory_over_cap"), "out_of_memory");
    assert_eq!(status("train"), "ok");

    for (i, n) in hash_lengths.iter().enumerate() {
        let bytes: Vec<u8> = (0..*n).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            got["hashes"][i].as_str(),
            Some(ContentId::of(&bytes).to_string().as_str()),
            "BLAKE3 of {n} bytes"
        );
    }
    assert_eq!(got["noble_matches_webcrypto"], true, "{got}");
    let refusals = got["refusals"].as_array().expect("refusals");
    for (i, option) in [
        "`domain` is required",
        "`domain` must be",
        "`cpuLimit` must be",
    ]
    .iter()
    .enumerate()
    {
        let msg = refusals[i].as_str().unwrap_or_default();
        assert!(msg.contains(option), "refusal {i}: {msg}");
    }
    // The 3 s deadline case alone would stall a page that ran tasks on its main thread for
    // 3 s; the bound leaves room for a loaded CI machine.
    let gap = got["max_gap_ms"].as_f64().expect("gap");
    assert!(
        gap < 2000.0,
        "the page stalled {gap} ms while tasks ran in workers"
    );
}

#[test]
fn a_browser_tab_contributes_through_a_connection_gateway() {
    if !browser_available("browser node through a gateway") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let s = |p: &str| d.join(p).to_string_lossy().into_owned();
    let r = root();
    std::fs::create_dir_all(d.join("gateway")).expect("gateway dir");
    let gateway_key = cli(&["keys", "new", "--key", &s("gateway/gateway.key"), "--json"]);
    let gateway_key = gateway_key["id"].as_str().expect("gateway id").to_string();
    let (_domain, url) = start_domain(
        d,
        &["--welcome-grant", "100000", "--gateway-key", &gateway_key],
    );
    let port = free_port();
    let gateway_url = format!("http://127.0.0.1:{port}");
    let _gateway = Proc::spawn(
        "gateway",
        &[
            "gateway",
            "--domain",
            &url,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data",
            &s("gateway"),
        ],
        &d.join("gateway.log"),
    );
    let gateway_metric = |name: &str| -> u64 {
        let out = Command::new("curl")
            .args(["-sf", &format!("{gateway_url}/metrics")])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    };
    wait_until("the gateway's link", Duration::from_secs(30), || {
        gateway_metric("stardust_gateway_linked") == 1
    });
    // One native node, directly; the tab through the gateway. Redundancy 2 on distinct
    // nodes: every task needs the tab too.
    let _native = start_nodes(&url, d, 1, 1);
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-node-gateway");
    std::fs::create_dir_all(&shots).expect("artifact dir");
    let mut page = ChildGuard(
        Command::new("node")
            .arg(r.join("web/tests/contrib.mjs"))
            .args([&url, shots.to_str().expect("utf-8"), &gateway_url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run node"),
    );
    let _stdin = page.0.stdin.take().expect("stdin");
    let mut lines = BufReader::new(page.0.stdout.take().expect("stdout")).lines();
    let browser_id = loop {
        let line = lines
            .next()
            .expect("contrib.mjs ended before READY")
            .expect("read");
        if let Some(id) = line.strip_prefix("READY ") {
            break id.to_string();
        }
        eprintln!("contrib.mjs: {line}");
    };
    // `contribute` resolves with the node's id before its session opens: the gateway
    // counts the tab once the tab has dialled it.
    wait_until(
        "the tab's session on the gateway",
        Duration::from_secs(30),
        || gateway_metric("stardust_gateway_sessions") == 1,
    );
    let job = job_file(
        d,
        "hello",
        &r.join("test-programs/hello.wasm"),
        "args = [\"{i}\"]\n[limits]\ntimeout = \"20s\"\n[sweep.grid]\ni = [1, 2, 3, 4]\n",
    );
    let key = s("client.key");
    let submitted = cli(&[
        "submit",
        job.to_str().expect("utf-8"),
        "--domain",
        &url,
        "--key",
        &key,
        "--json",
    ]);
    let id = submitted["job_id"].as_u64().expect("job id").to_string();
    let status = || {
        cli(&[
            "job", "status", &id, "--domain", &url, "--key", &key, "--json",
        ])
    };
    wait_until("the job to end", Duration::from_secs(120), || {
        !["queued", "running"].contains(&status()["state"].as_str().unwrap_or(""))
    });
    let done = status();
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["tasks_verified"], 4, "{done}");
    let nodes = cli(&["nodes", "--domain", &url, "--json"]);
    let tab = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == browser_id.as_str())
        .unwrap_or_else(|| panic!("the tab is not among the domain's nodes: {nodes}"));
    assert_eq!(tab["tier"], "browser", "{tab}");
    assert!(
        tab["agreed"].as_u64().unwrap_or(0) >= 4,
        "the tab ran every task's second replica: {tab}"
    );
    assert!(gateway_metric(r#"stardust_gateway_frames_total{direction="to_domain"}"#) >= 2);
}

/// Kills the page driver if the test fails half-way, so nothing is left running.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A job file with `redundancy = 2`, adaptive replication off (so every task keeps one
/// replica on each of the two nodes) and browser-sized limits.
fn job_file(dir: &Path, name: &str, module: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\nmodule = {module:?}\nredundancy = 2\nadaptive = false\n{extra}"
    );
    std::fs::write(&path, text).expect("job file");
    path
}

#[test]
fn a_browser_tab_and_a_native_node_verify_a_job_together() {
    if !browser_available("browser node end-to-end test") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let s = |p: &str| d.join(p).to_string_lossy().into_owned();
    let r = root();
    let (_domain, url) = start_domain(d, &["--welcome-grant", "100000"]);
    let _native = start_nodes(&url, d, 1, 1);
    let key = s("client.key");
    let submit = |file: &Path| {
        let args = [
            "submit",
            file.to_str().expect("utf-8"),
            "--domain",
            &url,
            "--key",
            &key,
            "--json",
        ];
        cli(&args)
    };
    // The sweep is queued before the page opens: the time to the first task is the page's.
    let train = job_file(
        d,
        "digits",
        &r.join("examples/hyperparam/train.wasm"),
        &format!(
            "input = {:?}\nargs = [\"{{lr}}\", \"{{hidden}}\", \"{{l2}}\", \"3\", \"1\"]\n\
             [limits]\nmemory = \"64MiB\"\ntimeout = \"20s\"\nmax_output = \"4KiB\"\nfuel = 20000000000\n\
             [sweep.grid]\nlr = [0.01, 0.03]\nhidden = [16, 32]\nl2 = [0.0, 0.001]\n",
            r.join("examples/hyperparam/digits.csv")
        ),
    );
    let job = submit(&train)["job_id"].as_u64().expect("job id");

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-node");
    std::fs::create_dir_all(&shots).expect("artifact dir");
    let mut page = ChildGuard(
        Command::new("node")
            .arg(r.join("web/tests/contrib.mjs"))
            .args([&url, shots.to_str().expect("utf-8")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run node"),
    );
    let mut stdin = page.0.stdin.take().expect("stdin");
    let mut lines = BufReader::new(page.0.stdout.take().expect("stdout")).lines();
    let mut next_line = |prefix: &str| -> String {
        for line in lines.by_ref() {
            let line = line.expect("read");
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_string();
            }
            eprintln!("contrib.mjs: {line}");
        }
        panic!("contrib.mjs ended before printing {prefix}");
    };
    let browser_id = next_line("READY ");
    assert_eq!(browser_id.len(), 64, "a NodeId: {browser_id}");

    eprintln!("browser node {browser_id} contributing; waiting for job {job}");
    let status = |job: u64| {
        cli(&[
            "job",
            "status",
            &job.to_string(),
            "--domain",
            &url,
            "--key",
            &key,
            "--json",
        ])
    };
    let ended = |v: &Value| !["queued", "running"].contains(&v["state"].as_str().unwrap_or(""));
    wait_until("the sweep to end", Duration::from_secs(120), || {
        ended(&status(job))
    });
    let done = status(job);
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["tasks_verified"], 8, "{done}");
    // Hostile modules: the page must stay responsive while its workers burn or bloat.
    let hostile = "args = [\"{i}\"]\n[limits]\nmemory = \"64MiB\"\ntimeout = \"20s\"\nmax_output = \"4KiB\"\nfuel = 2000000000\n[sweep.grid]\ni = [1, 2]\n";
    let spin = job_file(
        d,
        "spin",
        &r.join("test-programs/infinite_loop.wasm"),
        hostile,
    );
    let bomb = job_file(
        d,
        "bomb",
        &r.join("test-programs/memory_bomb.wasm"),
        hostile,
    );
    let spin = submit(&spin);
    let bomb = submit(&bomb);
    for j in [&spin, &bomb] {
        let id = j["job_id"].as_u64().expect("id");
        wait_until("a hostile job to end", Duration::from_secs(120), || {
            ended(&status(id))
        });
        assert_eq!(status(id)["state"], "completed", "{j}");
    }

    // Owner control: a pause (and a hidden tab) reaches the domain at once; so does resuming.
    let state = || {
        let nodes = cli(&["nodes", "--domain", &url, "--json"]);
        nodes["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["id"] == browser_id.as_str())
            .map(|n| n["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    writeln!(stdin, "PAUSE").expect("pause");
    let paused: Value = serde_json::from_str(&next_line("PAUSED ")).expect("json");
    assert_eq!(paused["paused"], true, "{paused}");
    assert_eq!(paused["reasons"], json!(["manual", "hidden"]), "{paused}");
    wait_until(
        "the domain to see the pause",
        Duration::from_secs(10),
        || state() == "paused",
    );
    writeln!(stdin, "RESUME").expect("resume");
    let resumed: Value = serde_json::from_str(&next_line("RESUMED ")).expect("json");
    assert_eq!(
        resumed["hidden"]["reasons"],
        json!(["hidden"]),
        "still hidden: {resumed}"
    );
    assert_eq!(resumed["visible"]["paused"], false, "{resumed}");
    wait_until(
        "the domain to see the resume",
        Duration::from_secs(10),
        || state() == "online",
    );

    // A visitor's input pauses the node until they have been still for `activeMs`.
    writeln!(stdin, "ACTIVE").expect("active");
    let active: Value = serde_json::from_str(&next_line("ACTIVE_DONE ")).expect("json");
    assert_eq!(active["during"]["reasons"], json!(["active"]), "{active}");
    assert_eq!(active["after"]["paused"], false, "{active}");

    // When the page's frame rate drops, the node steps back, and returns once it recovers.
    writeln!(stdin, "JANK").expect("jank");
    let janked: Value = serde_json::from_str(&next_line("JANKED ")).expect("json");
    let states = janked["states"].as_array().expect("states");
    assert!(
        states.iter().any(|s| s["reasons"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("frame_rate")))),
        "no back-off on a slow frame rate: {janked}"
    );
    assert_eq!(janked["now"]["paused"], false, "{janked}");

    writeln!(stdin, "FINISH").expect("finish");
    let final_: Value = serde_json::from_str(&next_line("FINAL ")).expect("final json");
    drop(stdin);
    let _ = page.0.wait();
    eprintln!("browser node: {}", final_["stats"]);

    // Every task of the sweep ran once in the browser, and the browser's report is the
    // verified one: identical output hash and metering.
    let results = cli(&[
        "job",
        "results",
        &job.to_string(),
        "--domain",
        &url,
        "--key",
        &key,
        "--json",
    ]);
    let events = final_["events"].as_array().expect("events");
    let mine = |job: u64| -> Vec<&Value> { events.iter().filter(|e| e["job"] == job).collect() };
    let browser_runs = mine(job);
    assert_eq!(
        browser_runs.len(),
        8,
        "one replica of each task in the browser: {events:?}"
    );
    for t in results["results"].as_array().expect("results") {
        assert_eq!(t["state"], "verified", "{t}");
        let b = browser_runs
            .iter()
            .find(|e| e["task"] == t["task"])
            .unwrap_or_else(|| panic!("task {} never ran in the browser", t["task"]));
        assert_eq!(b["status"], t["status"], "{t} vs {b}");
        assert_eq!(b["fuel_used"], t["fuel_used"], "{t} vs {b}");
        assert_eq!(b["output"], t["output"], "{t} vs {b}");
        assert!(
            t["output_text"]
                .as_str()
                .unwrap_or_default()
                .contains("accuracy"),
            "{t}"
        );
    }
    // The hostile jobs ended deterministically, agreed between the browser and the native
    // node, and the page never stalled.
    for (j, status) in [(&spin, "out_of_fuel"), (&bomb, "out_of_memory")] {
        let id = j["job_id"].as_u64().expect("id");
        let runs = mine(id);
        assert_eq!(runs.len(), 2, "{j}");
        assert!(runs.iter().all(|e| e["status"] == status), "{runs:?}");
        let res = cli(&[
            "job",
            "results",
            &id.to_string(),
            "--domain",
            &url,
            "--key",
            &key,
            "--json",
        ]);
        for t in res["results"].as_array().expect("results") {
            assert_eq!(t["status"], status, "{t}");
        }
    }
    // Each spinning task burns about 4 s: run on the main thread, it would stall the page
    // that long. The bound leaves room for a loaded CI machine.
    let gap = final_["max_gap_ms"].as_f64().expect("gap");
    assert!(gap < 2000.0, "the page stalled for {gap} ms");
    assert_eq!(final_["page_errors"], json!([]), "{final_}");

    // The browser's key is credited, the page heard of it, and the widget shows it.
    let nodes = cli(&["nodes", "--domain", &url, "--json"]);
    let me = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == browser_id.as_str())
        .unwrap_or_else(|| panic!("the browser is a node: {nodes}"));
    assert_eq!(me["tier"], "browser", "{me}");
    assert!(me["credits"].as_i64().unwrap_or(0) > 0, "{me}");
    assert!(
        final_["stats"]["credits"].as_i64().unwrap_or(0) > 0,
        "{final_}"
    );
    assert!(
        final_["widget_credits"].as_f64().unwrap_or(0.0) > 0.0,
        "{final_}"
    );
    assert_eq!(final_["stats"]["key"], "webcrypto");
    let audit = cli(&["ledger", "verify", "--data", &s("domain"), "--json"]);
    assert_eq!(audit["ok"], true, "{audit}");

    let first = final_["events"][0]["at"].as_f64().expect("first task");
    eprintln!(
        "page load to first task: {first:.0} ms (script loaded at {:.0} ms); longest main-thread stall {gap:.0} ms; lowest frame rate {:.0} fps",
        final_["script_loaded_ms"].as_f64().unwrap_or_default(),
        final_["min_fps"].as_f64().unwrap_or_default()
    );
}

#[test]
fn the_vendored_ed25519_is_the_pinned_npm_package() {
    let script = root().join("web/contrib/vendor.sh");
    if !root().join("web/node_modules/@noble/ed25519").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install web/node_modules (npm ci --prefix web)"
        );
        eprintln!("SKIPPED vendor check: web/node_modules is not installed");
        return;
    }
    let out = Command::new("bash")
        .arg(&script)
        .arg("--check")
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "web/contrib/vendor/ differs from web/node_modules: rerun web/contrib/vendor.sh\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
