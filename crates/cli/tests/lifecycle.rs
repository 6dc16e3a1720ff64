//! End-to-end lifecycle: the real binary as a domain and three nodes, separate processes. A
//! sweep of 200 tasks with redundancy 2 runs; the domain is killed with SIGKILL mid-job and
//! restarted on the same data; every task must end verified exactly once. Runs on SQLite,
//! and on PostgreSQL when `STARDUST_TEST_POSTGRES_URL` is set (CI sets it).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use common::{Proc, cli, free_port, healthy, root, start_domain, start_nodes, wait_until};

const TASKS: usize = 200;
const ITERATIONS: &str = "3000000";

fn run_lifecycle(database: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::copy(root().join("test-programs/busy.wasm"), d.join("busy.wasm")).expect("module");
    let grid: Vec<usize> = (0..TASKS).collect();
    let job = serde_json::json!({
        "name": "lifecycle",
        "module": "busy.wasm",
        "args": [ITERATIONS, "{i}"],
        "redundancy": 2,
        "limits": {"memory": "32MiB", "timeout": "30s"},
        "sweep": {"grid": {"i": grid}},
    });
    std::fs::write(d.join("job.json"), job.to_string()).expect("job file");

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let data = d.join("domain");
    let data_s = data.to_str().expect("utf-8");
    let mut domain_args = vec![
        "domain",
        "--listen",
        &listen,
        "--data",
        data_s,
        "--lease",
        "5s",
        "--heartbeat",
        "500ms",
        "--welcome-grant",
        "100000",
    ];
    if let Some(db) = &database {
        domain_args.extend(["--database", db.as_str()]);
    }
    let domain = Proc::spawn("domain", &domain_args, &d.join("domain-1.log"));
    wait_until("the domain", Duration::from_secs(30), || healthy(&url));

    let node_dirs: Vec<String> = (0..3)
        .map(|i| d.join(format!("node{i}")).to_string_lossy().into_owned())
        .collect();
    let nodes: Vec<Proc> = node_dirs
        .iter()
        .enumerate()
        .map(|(i, nd)| {
            Proc::spawn(
                "node",
                &[
                    "node",
                    "--domain",
                    &url,
                    "--data",
                    nd,
                    "--slots",
                    "2",
                    "--no-bench",
                    "--nice",
                    "0",
                ],
                &d.join(format!("node{i}.log")),
            )
        })
        .collect();

    let key = d.join("client.key");
    let key_s = key.to_str().expect("utf-8");
    let job_file = d.join("job.json");
    let submitted = cli(&[
        "submit",
        job_file.to_str().expect("utf-8"),
        "--domain",
        &url,
        "--key",
        key_s,
        "--json",
    ]);
    let id = submitted["job_id"].as_u64().expect("job id").to_string();
    let status = || {
        cli(&[
            "job", "status", &id, "--domain", &url, "--key", key_s, "--json",
        ])
    };

    // Kill the domain once part of the job is verified, but not all.
    wait_until("some verified tasks", Duration::from_secs(120), || {
        status()["tasks_verified"].as_u64().unwrap_or(0) >= 30
    });
    let before = status();
    assert!(
        before["tasks_verified"].as_u64().unwrap_or(0) < TASKS as u64,
        "the job finished before the kill: make tasks longer"
    );
    domain.kill9();

    let domain = Proc::spawn("domain", &domain_args, &d.join("domain-2.log"));
    wait_until("the restarted domain", Duration::from_secs(30), || {
        healthy(&url)
    });
    wait_until("the job to end", Duration::from_secs(240), || {
        matches!(status()["state"].as_str(), Some("completed" | "failed"))
    });

    let fin = status();
    assert_eq!(fin["state"], "completed", "{fin}");
    assert_eq!(fin["tasks_total"], TASKS);
    assert_eq!(fin["tasks_verified"], TASKS, "every task verified: {fin}");
    assert_eq!(fin["tasks_failed"], 0);
    assert!(
        fin["tasks_verified"].as_u64() >= before["tasks_verified"].as_u64(),
        "nothing verified before the kill was lost"
    );

    // Every task exactly once, with the right output.
    let results = cli(&[
        "job", "results", &id, "--domain", &url, "--key", key_s, "--json",
    ]);
    let results = results["results"].as_array().expect("results");
    assert_eq!(results.len(), TASKS);
    let mut seen = [false; TASKS];
    let mut checksum = None;
    for r in results {
        let i = r["index"].as_u64().expect("index") as usize;
        assert!(!seen[i], "task {i} listed twice");
        seen[i] = true;
        assert_eq!(r["state"], "verified");
        let text = r["output_text"].as_str().expect("inline output");
        let (head, sum) = text.trim_end().rsplit_once(" -> ").expect("checksum");
        assert_eq!(head, format!("busy {ITERATIONS} {i}"));
        assert_eq!(
            *checksum.get_or_insert_with(|| sum.to_string()),
            sum,
            "same work, same checksum"
        );
    }

    // The nodes drain and exit cleanly; then the domain.
    for n in nodes {
        assert!(
            n.terminate(Duration::from_secs(30)).success(),
            "a node exits 0 after draining"
        );
    }
    assert!(domain.terminate(Duration::from_secs(30)).success());

    // The ledger survived the kill: it verifies, and every task was paid exactly once.
    let mut verify_args = vec!["ledger", "verify", "--data", data_s, "--json"];
    if let Some(db) = &database {
        verify_args.extend(["--database", db.as_str()]);
    }
    let audit = cli(&verify_args);
    assert_eq!(audit["ok"], true, "{audit}");
    assert_eq!(audit["tasks_paid"], TASKS, "{audit}");
    assert_eq!(
        audit["escrow_held"], 0,
        "the finished job's escrow was settled or refunded"
    );
}

#[test]
fn kill_9_of_the_domain_mid_job_loses_nothing_on_sqlite() {
    run_lifecycle(None);
}

#[test]
fn kill_9_of_the_domain_mid_job_loses_nothing_on_postgres() {
    let Ok(admin) = std::env::var("STARDUST_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set STARDUST_TEST_POSTGRES_URL"
        );
        eprintln!("SKIPPED: PostgreSQL not configured (STARDUST_TEST_POSTGRES_URL)");
        return;
    };
    let name = format!("stardust_test_e2e_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&admin).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create database");
    });
    let (base, _) = admin.rsplit_once('/').expect("URL with a database");
    run_lifecycle(Some(format!("{base}/{name}")));
}

#[test]
fn settings_come_from_flags_then_environment_then_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let config = dir.path().join("domain.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{file_port}\"\nlease = \"20s\"\n"),
    )
    .expect("config");
    let data = dir.path().join("d");
    let start = |extra: &[&str], env: Option<u16>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stardust"));
        c.args([
            "domain",
            "--config",
            config.to_str().expect("utf-8"),
            "--data",
            data.to_str().expect("utf-8"),
        ])
        .args(extra);
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = env {
            c.env("STARDUST_LISTEN", format!("127.0.0.1:{p}"));
        }
        Proc {
            child: c.spawn().expect("spawn"),
            name: "domain",
            log: None,
        }
    };
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let d = start(&[], None);
    wait_until("the file's port", Duration::from_secs(30), || {
        healthy(&url(file_port))
    });
    d.kill9();
    let d = start(&[], Some(env_port));
    wait_until("the environment's port", Duration::from_secs(30), || {
        healthy(&url(env_port))
    });
    d.kill9();
    let flag = format!("127.0.0.1:{flag_port}");
    let d = start(&["--listen", &flag], Some(env_port));
    wait_until("the flag's port", Duration::from_secs(30), || {
        healthy(&url(flag_port))
    });
    d.kill9();
    std::fs::write(&config, "bogus = 1\n").expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_stardust"))
        .args([
            "domain",
            "--config",
            config.to_str().expect("utf-8"),
            "--data",
            data.to_str().expect("utf-8"),
        ])
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown config keys"));
}

#[test]
fn tls_end_to_end_with_a_private_ca_directly_and_through_a_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A self-signed certificate for the loopback address, trusted through --ca.
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    std::fs::write(d.join("cert.pem"), cert.cert.pem()).expect("cert");
    std::fs::write(d.join("key.pem"), cert.signing_key.serialize_pem()).expect("key");
    std::fs::copy(
        root().join("test-programs/hello.wasm"),
        d.join("hello.wasm"),
    )
    .expect("module");
    std::fs::write(
        d.join("job.toml"),
        "module = \"hello.wasm\"\nargs = [\"{i}\"]\nredundancy = 1\n[sweep.grid]\ni = [1, 2, 3, 4]\n",
    )
    .expect("job");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("https://127.0.0.1:{port}");
    let s = |p: &str| d.join(p).to_string_lossy().into_owned();
    // The gateway's key, listed on the domain.
    std::fs::create_dir_all(d.join("gateway")).expect("gateway dir");
    let gateway_key = cli(&["keys", "new", "--key", &s("gateway/gateway.key"), "--json"]);
    let gateway_key = gateway_key["id"].as_str().expect("gateway id").to_string();
    let _domain = Proc::spawn(
        "domain",
        &[
            "domain",
            "--listen",
            &listen,
            "--data",
            &s("domain"),
            "--welcome-grant",
            "1000000",
            "--tls-cert",
            &s("cert.pem"),
            "--tls-key",
            &s("key.pem"),
            "--gateway-key",
            &gateway_key,
        ],
        &d.join("domain.log"),
    );
    let ca = s("cert.pem");
    let tls_healthy = || {
        Command::new(env!("CARGO_BIN_EXE_stardust"))
            .args(["nodes", "--domain", &url, "--ca", &ca, "--json"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    wait_until("the TLS domain", Duration::from_secs(30), tls_healthy);
    // Without the CA the certificate is not trusted; plain HTTP is not spoken.
    let untrusted = Command::new(env!("CARGO_BIN_EXE_stardust"))
        .args(["nodes", "--domain", &url, "--json"])
        .output()
        .expect("spawn");
    assert!(
        !untrusted.status.success(),
        "a self-signed certificate is refused without --ca"
    );
    assert!(
        !healthy(&format!("http://127.0.0.1:{port}")),
        "no plain HTTP on a TLS port"
    );

    let node = Proc::spawn(
        "node",
        &[
            "node",
            "--domain",
            &url,
            "--ca",
            &ca,
            "--data",
            &s("node"),
            "--slots",
            "2",
            "--no-bench",
            "--nice",
            "0",
        ],
        &d.join("node.log"),
    );
    let key = s("client.key");
    let job = s("job.toml");
    let done = cli(&[
        "submit", &job, "--domain", &url, "--ca", &ca, "--key", &key, "--wait", "--json",
    ]);
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["tasks_verified"], 4);
    assert!(node.terminate(Duration::from_secs(30)).success());

    // A gateway, itself TLS both ways: to the domain (trusting --ca) and to its nodes.
    let gateway_port = free_port();
    let gateway_url = format!("https://127.0.0.1:{gateway_port}");
    let _gateway = Proc::spawn(
        "gateway",
        &[
            "gateway",
            "--domain",
            &url,
            "--ca",
            &ca,
            "--listen",
            &format!("127.0.0.1:{gateway_port}"),
            "--data",
            &s("gateway"),
            "--tls-cert",
            &s("cert.pem"),
            "--tls-key",
            &s("key.pem"),
        ],
        &d.join("gateway.log"),
    );
    // Only a node behind the gateway is left to run the next job.
    let relayed = Proc::spawn(
        "node behind the gateway",
        &[
            "node",
            "--domain",
            &url,
            "--gateway",
            &gateway_url,
            "--ca",
            &ca,
            "--data",
            &s("relayed-node"),
            "--slots",
            "2",
            "--no-bench",
            "--nice",
            "0",
        ],
        &d.join("relayed-node.log"),
    );
    let done = cli(&[
        "submit", &job, "--domain", &url, "--ca", &ca, "--key", &key, "--wait", "--json",
    ]);
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["tasks_verified"], 4);
    let nodes = cli(&["nodes", "--domain", &url, "--ca", &ca, "--json"]);
    let connected: Vec<&str> = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["state"] != "offline")
        .filter_map(|n| n["id"].as_str())
        .collect();
    let relayed_id = cli(&[
        "keys",
        "show",
        "--key",
        &s("relayed-node/node.key"),
        "--json",
    ]);
    assert_eq!(
        connected,
        vec![relayed_id["id"].as_str().expect("id")],
        "only the relayed node is connected: {nodes}"
    );
    assert!(relayed.terminate(Duration::from_secs(30)).success());
}

#[test]
fn hostile_tasks_end_with_agreed_outcomes_and_the_nodes_keep_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for m in [
        "infinite_loop.wasm",
        "memory_bomb.wasm",
        "deep_recursion.wasm",
        "hello.wasm",
    ] {
        std::fs::copy(root().join("test-programs").join(m), d.join(m)).expect("module");
    }
    let s = |p: &str| d.join(p).to_string_lossy().into_owned();
    let (_domain, url) = start_domain(d, &["--welcome-grant", "1000000"]);
    let nodes = start_nodes(&url, d, 2, 2);
    let key = s("client.key");
    let run = |module: &str, limits: &str| -> Value {
        let file = d.join(format!("{module}.toml"));
        std::fs::write(
            &file,
            format!("module = \"{module}\"\nredundancy = 2\n[limits]\n{limits}\n"),
        )
        .expect("job");
        cli(&[
            "submit",
            file.to_str().expect("utf-8"),
            "--domain",
            &url,
            "--key",
            &key,
            "--wait",
            "--json",
        ])
    };
    for (module, limits, status) in [
        ("infinite_loop.wasm", "fuel = 5000000", "out_of_fuel"),
        ("memory_bomb.wasm", "memory = \"16MiB\"", "out_of_memory"),
        ("deep_recursion.wasm", "", "trap"),
    ] {
        let done = run(module, limits);
        assert_eq!(done["state"], "completed", "{module}: {done}");
        assert_eq!(
            done["tasks_verified"], 1,
            "{module}: both replicas agree on the failure"
        );
        let id = done["job_id"].to_string();
        let results = cli(&[
            "job", "results", &id, "--domain", &url, "--key", &key, "--json",
        ]);
        assert_eq!(
            results["results"][0]["status"], status,
            "{module}: {results}"
        );
    }
    // The same nodes still run ordinary work.
    let done = run("hello.wasm", "");
    assert_eq!(done["tasks_verified"], 1, "{done}");
    for n in nodes {
        assert!(n.terminate(Duration::from_secs(30)).success());
    }
}

/// The nice value of each thread of process `pid`, by thread name (Linux `/proc`).
fn thread_nice(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(t.path().join("comm")),
            std::fs::read_to_string(t.path().join("stat")),
        ) else {
            continue;
        };
        // Fields after the name (which may hold spaces) in parentheses: state is field 3,
        // nice field 19.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        if let Some(nice) = rest.split_whitespace().nth(16).and_then(|n| n.parse().ok()) {
            out.push((comm.trim().to_string(), nice));
        }
    }
    out
}

#[test]
fn a_node_runs_below_its_owners_work_unless_told_otherwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // No domain listens there: the node keeps retrying, its threads up.
    let domain = format!("http://127.0.0.1:{}", free_port());
    let ours = thread_nice(std::process::id())
        .first()
        .map(|(_, n)| *n)
        .expect("this test's own nice value");
    for (flag, want) in [(None, 19), (Some("0"), ours)] {
        let data = d.join(format!("node-{}", flag.unwrap_or("default")));
        let data = data.to_str().expect("utf-8");
        let mut args = vec!["node", "--domain", &domain, "--data", data, "--no-bench"];
        if let Some(n) = flag {
            args.extend(["--nice", n]);
        }
        let node = Proc::spawn("node", &args, &d.join("node.log"));
        let pid = node.child.id();
        let mut threads = Vec::new();
        wait_until(
            "the node's runtime threads",
            Duration::from_secs(20),
            || {
                threads = thread_nice(pid);
                threads.iter().any(|(name, _)| name == "tokio-rt-worker")
            },
        );
        assert!(
            threads.iter().all(|(_, nice)| *nice == want.max(ours)),
            "--nice {flag:?}: every thread at nice {want}: {threads:?}"
        );
        node.kill9();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_stardust"))
        .args(["node", "--domain", &domain, "--nice", "20"])
        .stdin(Stdio::null())
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--nice") && err.contains("20"), "{err}");
}
