//! The dashboard in a real headless Chromium (Debian's `chromium`, driven by npm
//! `playwright-core` from `web/tests/dashboard.mjs`), against a real domain and two node
//! processes that ran the hyperparameter sweep; and `/metrics` parsed as Prometheus text.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{browser_available, cli, root, start_domain, start_nodes};

/// Checks the text exposition format 0.0.4 line by line; returns the family names.
fn parse_prometheus(text: &str) -> Vec<String> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut families = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(name_ok(name), "bad family name: {line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            families.push(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value: {line}"
        );
        let name = series.split('{').next().unwrap_or_default();
        assert!(name_ok(name), "bad metric name: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad label set: {line}"));
            for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label: {line}"));
                assert!(name_ok(k), "bad label name: {line}");
                assert!(!v.trim_end_matches('"').contains('\n'));
            }
        }
        let family = families.last().map(String::as_str).unwrap_or_default();
        assert!(
            name == family
                || name
                    .strip_prefix(family)
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s)),
            "sample {name} outside its family {family}"
        );
    }
    families
}

fn http_get(url: &str) -> String {
    let out = Command::new("curl").args(["-sf", url]).output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            // No curl: a minimal HTTP/1.1 GET.
            use std::io::{Read, Write};
            let rest = url.strip_prefix("http://").expect("http URL");
            let (host, path) = rest
                .split_once('/')
                .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
            let mut s = std::net::TcpStream::connect(host).expect("connect");
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .expect("write");
            let mut buf = String::new();
            s.read_to_string(&mut buf).expect("read");
            buf.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default()
        }
    }
}

#[test]
fn dashboard_widget_and_metrics_in_a_real_browser() {
    if !browser_available("dashboard browser test") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let s = |p: &str| d.join(p).to_string_lossy().into_owned();
    let (_domain, url) = start_domain(d, &["--welcome-grant", "100000"]);
    let _nodes = start_nodes(&url, d, 2, 1);
    let key = s("client.key");
    let job = root().join("examples/hyperparam/job.toml");
    let status = cli(&[
        "submit",
        job.to_str().expect("utf-8"),
        "--wait",
        "--domain",
        &url,
        "--key",
        &key,
        "--json",
    ]);
    assert_eq!(status["state"], "completed", "{status}");
    let node0 = cli(&["keys", "show", "--key", &s("node0/node.key"), "--json"]);
    let node0 = node0["id"].as_str().expect("node id");

    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).expect("artifact dir");
    let out = Command::new("node")
        .arg(root().join("web/tests/dashboard.mjs"))
        .args([
            &url,
            node0,
            &status["job_id"].to_string(),
            shots.to_str().expect("utf-8"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run node");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "browser checks failed:\n{log}");
    assert!(log.contains("dashboard and widget OK"), "{log}");
    let png = std::fs::read(shots.join("dashboard.png")).expect("screenshot kept");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("screenshots kept in {}", shots.display());

    // The snapshot the page draws: every node, and a point per verified trial of the sweep.
    let snap: serde_json::Value =
        serde_json::from_str(&http_get(&format!("{url}/v1/dashboard"))).expect("snapshot JSON");
    let nodes = snap["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{snap}");
    assert!(nodes.iter().all(|n| n["state"] == "online"), "{snap}");
    assert_eq!(snap["connected"], 2, "{snap}");
    assert_eq!(snap["sweep"]["job_id"], status["job_id"], "{snap}");
    assert_eq!(
        snap["sweep"]["points"].as_array().map(Vec::len),
        Some(48),
        "{snap}"
    );
    assert!(
        snap["sweep"]["metric"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{snap}"
    );

    // Prometheus text, with the families the dashboard issue asks for.
    let text = http_get(&format!("{url}/metrics"));
    let families = parse_prometheus(&text);
    for f in [
        "stardust_tasks",
        "stardust_dispatch_latency_seconds",
        "stardust_end_to_end_latency_seconds",
        "stardust_verification_outcomes_total",
        "stardust_nodes_connected",
        "stardust_ledger_events",
        "stardust_ledger_microcredits",
        "stardust_rejected_messages_total",
        "stardust_http_requests_total",
    ] {
        assert!(
            families.iter().any(|x| x == f),
            "missing family {f}:\n{text}"
        );
    }
    assert!(
        text.contains("stardust_tasks{state=\"verified\"} 48\n"),
        "{text}"
    );
    assert!(text.contains("stardust_nodes_connected 2\n"), "{text}");
    assert!(
        text.contains("stardust_http_requests_total{route=\"/v1/jobs\",status=\"201\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("stardust_end_to_end_latency_seconds_count 48\n"),
        "{text}"
    );
}

#[test]
fn the_prometheus_checker_can_fail() {
    for bad in [
        "# TYPE x counter\nx{a=\"1\"} notanumber\n",
        "# TYPE x counter\ny 1\n",
        "# TYPE 9x gauge\n",
        "# TYPE x gauge\nx{a=1} 2\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(),
            "{bad}"
        );
    }
    assert_eq!(parse_prometheus("# HELP x h\n# TYPE x gauge\nx 1\n"), ["x"]);
}

#[test]
fn viewers_share_a_snapshot_for_a_second_and_it_counts_every_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (_domain, url) = start_domain(d, &[]);
    let _nodes = start_nodes(&url, d, 1, 1);
    let snapshot = || -> serde_json::Value {
        serde_json::from_str(&http_get(&format!("{url}/v1/dashboard"))).expect("snapshot JSON")
    };
    let t0 = std::time::Instant::now();
    while snapshot()["connected"] != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the node never connected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = std::time::Instant::now();
    let snaps: Vec<serde_json::Value> = (0..5).map(|_| snapshot()).collect();
    let quick = t.elapsed() < Duration::from_millis(900);
    let stamps: Vec<i64> = snaps
        .iter()
        .map(|s| s["now_ms"].as_i64().expect("now_ms"))
        .collect();
    // A snapshot is built again only once the last is a second old.
    for w in stamps.windows(2) {
        assert!(w[0] == w[1] || w[1] - w[0] >= 1000, "{stamps:?}");
    }
    if quick {
        let mut distinct = stamps.clone();
        distinct.dedup();
        assert!(distinct.len() <= 2, "{stamps:?}");
    }
    let last = &snaps[4];
    assert_eq!(last["nodes_total"], 1, "{last}");
    assert_eq!(last["nodes"].as_array().map(Vec::len), Some(1), "{last}");
}
