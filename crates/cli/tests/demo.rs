//! `stardust demo` and the hyperparameter-search example it runs, through the real binary.

mod common;

use std::process::{Command, Stdio};

use common::root;
use serde_json::Value;

fn stardust(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stardust"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_json(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn the_demo_runs_the_sweep_verifies_pays_and_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("demo");
    let (code, out, err) = stardust(&[
        "demo",
        "--nodes",
        "2",
        "--data",
        data.to_str().expect("utf-8"),
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v = last_json(&out);
    assert_eq!(v["tasks_total"], 48, "{v}");
    assert_eq!(v["tasks_verified"], 48, "{v}");
    assert_eq!(v["tasks_failed"], 0, "{v}");
    assert_eq!(v["ledger_ok"], true, "{v}");
    assert_eq!(v["ledger"]["tasks_paid"], 48, "{v}");
    let best = &v["best"];
    let acc = best["accuracy"].as_f64().expect("accuracy");
    assert!(acc >= 0.95, "the best trial learns the digits: {best}");
    for p in ["lr", "hidden", "l2"] {
        assert!(best["params"][p].is_number(), "{best}");
    }
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2);
    for n in nodes {
        assert!(n["credits"].as_f64().unwrap_or(0.0) > 0.0, "{n}");
        assert!(n["tasks"].as_u64().unwrap_or(0) > 0, "{n}");
        assert!(n["id"].as_str().is_some_and(|s| s.len() == 64), "{n}");
    }
    assert!(v["elapsed_s"].as_f64().is_some());
    let report = std::path::PathBuf::from(v["report"].as_str().expect("report path"));
    assert!(report.starts_with(&data));
    let html = std::fs::read_to_string(&report).expect("report written");
    assert!(html.contains("<svg") && html.contains("validation accuracy"));
    assert_eq!(
        html.matches("<tr><td>").count(),
        48,
        "one table row per trial"
    );

    // The best trial, re-run locally under the same sandbox, gives the same numbers.
    let p = &best["params"];
    let (code, out, err) = stardust(&[
        "run",
        root()
            .join("examples/hyperparam/train.wasm")
            .to_str()
            .expect("utf-8"),
        "--input",
        root()
            .join("examples/hyperparam/digits.csv")
            .to_str()
            .expect("utf-8"),
        "--fuel",
        "20000000000",
        "--",
        &p["lr"].to_string(),
        &p["hidden"].to_string(),
        &p["l2"].to_string(),
        "15",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let local: Value = serde_json::from_str(out.trim()).expect("metrics JSON");
    assert_eq!(local["val_accuracy"].as_f64(), Some(acc));
    assert_eq!(local["val_size"], 360);
    assert_eq!(local["train_size"], 1437);
}

#[test]
fn the_demo_refuses_bad_arguments_clearly() {
    let (code, _, err) = stardust(&["demo", "--nodes", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--nodes must be 1..=64"), "{err}");
}

#[test]
fn the_training_program_refuses_bad_input_and_arguments() {
    let module = root().join("examples/hyperparam/train.wasm");
    let module = module.to_str().expect("utf-8");
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.csv");
    std::fs::write(&junk, "1,2,3\nnot,a,digit\n").expect("junk");
    let (_, out, _) = stardust(&[
        "run",
        module,
        "--input",
        junk.to_str().expect("utf-8"),
        "--json",
        "--",
        "0.1",
        "16",
        "0",
        "1",
        "1",
    ]);
    let report = last_json(&out);
    assert_eq!(report["status"], "exit_nonzero", "{report}");
    assert_eq!(report["exit_code"], 3, "{report}");
    let csv = root().join("examples/hyperparam/digits.csv");
    for bad in [
        ["abc", "16", "0", "1", "1"],
        ["0.1", "999", "0", "1", "1"],
        ["0.1", "16", "-1", "1", "1"],
    ] {
        let mut args = vec![
            "run",
            module,
            "--input",
            csv.to_str().expect("utf-8"),
            "--json",
            "--",
        ];
        args.extend(bad);
        let (_, out, _) = stardust(&args);
        let report = last_json(&out);
        assert_eq!(report["exit_code"], 2, "{bad:?}: {report}");
    }
}
