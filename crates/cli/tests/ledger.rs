//! The credit ledger through the real binary: quotes, the refusal of an unfunded job, an
//! operator's grant, settlement, `ledger balances`, `ledger verify`, and tamper detection
//! down to the event.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{cli, root, start_domain, start_nodes};

fn stardust(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stardust"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn jobs_are_paid_from_escrow_and_a_tampered_event_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::copy(
        root().join("test-programs/hello.wasm"),
        d.join("hello.wasm"),
    )
    .expect("module");
    let job = serde_json::json!({
        "name": "ledger",
        "module": "hello.wasm",
        "args": ["{i}"],
        "redundancy": 2,
        "adaptive": false,
        "limits": {"fuel": 2_000_000_000u64},
        "sweep": {"grid": {"i": [1, 2, 3, 4]}},
    });
    let job_file = d.join("job.json");
    std::fs::write(&job_file, job.to_string()).expect("job file");
    let job_s = job_file.to_str().expect("utf-8");

    let data = d.join("domain");
    let data_s = data.to_str().expect("utf-8");
    let (domain, url) = start_domain(d, &["--spot-rate", "0", "--price", "1000"]);
    let nodes = start_nodes(&url, d, 2, 2);
    let key = d.join("client.key");
    let key_s = key.to_str().expect("utf-8");
    let conn = ["--domain", url.as_str(), "--key", key_s, "--json"];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(conn.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: &[&str]| {
        let v = with(args);
        cli(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // The quote: 4 tasks × 2 replicas × 2 SCU at the price per SCU (base × demand).
    let quote = run(&["quote", job_s]);
    assert_eq!(quote["tasks"], 4);
    assert_eq!(quote["balance"], 0);
    assert_eq!(quote["affordable"], false);
    let max_cost = quote["max_cost"].as_u64().expect("max cost");
    assert_eq!(
        max_cost,
        8 * 2 * quote["price_per_scu"].as_u64().expect("price"),
        "{quote}"
    );

    // Without credits the job is refused, with the way out in the message.
    let v = with(&["submit", job_s]);
    let (ok, _, err) = stardust(&v.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok);
    assert!(
        err.contains("insufficient_credits") || err.contains("balance is 0"),
        "{err}"
    );
    assert!(err.contains("stardust ledger grant"), "{err}");

    // An operator grants credits (while the domain runs); then the job runs and is paid.
    let me = cli(&["keys", "show", "--key", key_s, "--json"]);
    let me = me["id"].as_str().expect("id");
    let granted = cli(&["ledger", "grant", me, "100000", "--data", data_s, "--json"]);
    assert_eq!(granted["balance"], 100_000_000_000u64);
    let status = run(&["submit", job_s, "--wait"]);
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["tasks_verified"], 4);
    let account = run(&["nodes"]);
    let paid: Vec<i64> = account["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["credits"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(paid.len(), 2);
    assert!(
        paid.iter().all(|c| *c > 0),
        "both providers earned: {paid:?}"
    );

    for n in nodes {
        assert!(n.terminate(Duration::from_secs(30)).success());
    }
    assert!(domain.terminate(Duration::from_secs(30)).success());

    let balances = cli(&["ledger", "balances", "--data", data_s, "--json"]);
    let b = &balances["balances"];
    let submitter = b[format!("submitter:{me}")]
        .as_i64()
        .expect("submitter balance");
    assert!(
        submitter < 100_000_000_000 && submitter > 100_000_000_000 - max_cost as i64,
        "{balances}"
    );
    assert!(b["treasury"].as_i64().unwrap_or(0) > 0, "{balances}");
    assert!(
        b[format!("author:{me}")].as_i64().unwrap_or(0) > 0,
        "the uploader is the author: {balances}"
    );
    assert!(
        b.as_object()
            .expect("map")
            .keys()
            .all(|k| !k.starts_with("escrow:")),
        "escrow emptied"
    );

    let audit = cli(&["ledger", "verify", "--data", data_s, "--json"]);
    assert_eq!(audit["ok"], true, "{audit}");
    assert_eq!(audit["tasks_paid"], 4);
    let events = audit["events"].as_u64().expect("events");
    assert!(events > 10, "{audit}");

    // Change one byte of one stored event: verify fails and names it.
    let target = events / 2;
    let id: String = {
        let db = rusqlite::Connection::open_with_flags(
            data.join("stardust.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
        )
        .expect("open");
        let (id, mut record): (String, Vec<u8>) = db
            .query_row(
                "SELECT id, record FROM ledger WHERE seq = ?1",
                [target as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("row");
        let pos = record.len() - 70;
        record[pos] ^= 0x20;
        db.execute(
            "UPDATE ledger SET record = ?1 WHERE seq = ?2",
            (record, target as i64),
        )
        .expect("tamper");
        id
    };
    let (ok, out, err) = stardust(&["ledger", "verify", "--data", data_s]);
    assert!(!ok, "a tampered ledger must not verify: {out}");
    assert!(
        err.contains(&format!("event #{target} ({id})")),
        "the tampered event is named: {err}"
    );
    let (ok, out, _) = stardust(&["ledger", "verify", "--data", data_s, "--json"]);
    assert!(!ok);
    let v: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["seq"], target);
    assert_eq!(v["error"]["id"], id.as_str());
}

/// A missing key file is named once with its reason once: the key file error leaves the OS
/// error to its source, which the CLI prints after it.
#[test]
fn a_missing_domain_key_is_reported_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("absent");
    let (ok, _, err) = stardust(&["ledger", "verify", "--data", &data.to_string_lossy()]);
    assert!(!ok, "verify without a key must fail");
    let key = data.join("domain.key").display().to_string();
    assert!(err.contains(&format!("{key}: No such file")), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}
