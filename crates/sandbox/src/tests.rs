//! One test per guest program in `test-programs/`, hostile ones included, each asserting its
//! outcome within its limit.

use std::sync::{Arc, OnceLock};

use stardust_proto::task::{Limits, Status, TrapKind};

use super::*;

fn sandbox() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| {
        Sandbox::new(Config {
            max_instances: 8,
            ..Config::default()
        })
        .expect("sandbox")
    })
}

fn program(name: &str) -> Vec<u8> {
    let path = format!("{}/../../test-programs/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    if name.ends_with(".wat") {
        wat::parse_bytes(&bytes).expect("wat").into_owned()
    } else {
        bytes
    }
}

fn limits() -> Limits {
    Limits {
        fuel: 1_000_000_000,
        memory_bytes: 64 << 20,
        wall_ms: 20_000,
        output_bytes: 1 << 20,
    }
}

fn run_with(name: &str, input: &[u8], args: &[&str], seed: u64, limits: Limits) -> RunOutput {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let task = Task {
        input: Arc::from(input),
        args: &args,
        seed,
        limits,
    };
    sandbox().run_unmetered(&program(name), &task)
}

fn run(name: &str) -> RunOutput {
    run_with(name, b"", &[], 0, limits())
}

fn text(out: &RunOutput) -> String {
    String::from_utf8_lossy(&out.output).into_owned()
}

#[test]
fn c_module_runs_with_args_and_input() {
    let out = run_with("hello.wasm", b"stardust\n", &["a", "b c"], 0, limits());
    assert_eq!(out.report.status, Status::Ok, "{:?}", out.report);
    assert_eq!(out.report.exit_code, Some(0));
    assert_eq!(text(&out), "hello from task with 2 args: a b c\nSTARDUST\n");
    assert_eq!(out.report.output, ContentId::of(&out.output));
    assert_eq!(out.report.output_len, out.output.len() as u64);
    assert!(out.report.fuel_used > 1000, "fuel {}", out.report.fuel_used);
}

#[test]
fn same_task_same_fingerprint_and_input_changes_it() {
    let a = run_with("hello.wasm", b"xyz", &["1"], 5, limits());
    let b = run_with("hello.wasm", b"xyz", &["1"], 5, limits());
    assert_eq!(a.report.fingerprint(), b.report.fingerprint());
    let c = run_with("hello.wasm", b"xyzw", &["1"], 5, limits());
    assert_ne!(
        a.report.fuel_used, c.report.fuel_used,
        "one more input byte costs fuel"
    );
    assert_ne!(a.report.output, c.report.output);
}

#[test]
fn exact_fuel_of_a_counted_loop() {
    // The worked example of docs/protocol.md, "Metering": 1 + 10 × 7 + 1 + 1 = 73.
    let wasm = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "_start") (local i32)
            (loop
              local.get 0 i32.const 1 i32.add local.tee 0
              i32.const 10 i32.lt_u br_if 0)))"#,
    )
    .expect("wat");
    let task = Task {
        input: Arc::from(&b""[..]),
        args: &[],
        seed: 0,
        limits: limits(),
    };
    let out = sandbox().run_unmetered(&wasm, &task);
    assert_eq!(out.report.status, Status::Ok);
    assert_eq!(out.report.fuel_used, 73);
}

#[test]
fn busy_work_is_deterministic_and_costs_fuel_in_proportion() {
    let a = run_with("busy.wasm", b"", &["100000", "t"], 0, limits());
    let b = run_with("busy.wasm", b"", &["200000", "t"], 0, limits());
    assert_eq!(a.report.status, Status::Ok);
    assert!(text(&a).starts_with("busy 100000 t -> "), "{}", text(&a));
    assert!(
        b.report.fuel_used > a.report.fuel_used * 3 / 2,
        "twice the iterations, about twice the fuel"
    );
    assert_eq!(
        a.report.fingerprint(),
        run_with("busy.wasm", b"", &["100000", "t"], 0, limits())
            .report
            .fingerprint()
    );
}

#[test]
fn nonzero_exit() {
    let out = run("exit_code.wasm");
    assert_eq!(out.report.status, Status::ExitNonzero);
    assert_eq!(out.report.exit_code, Some(3));
    assert_eq!(text(&out), "about to fail\n");
}

#[test]
fn infinite_loop_runs_out_of_fuel_exactly_at_the_limit() {
    let l = Limits {
        fuel: 5_000_000,
        ..limits()
    };
    let out = run_with("infinite_loop.wasm", b"", &[], 0, l);
    assert_eq!(out.report.status, Status::OutOfFuel);
    assert_eq!(out.report.fuel_used, 5_000_000);
    let again = run_with("infinite_loop.wasm", b"", &[], 0, l);
    assert_eq!(out.report.fingerprint(), again.report.fingerprint());
}

#[test]
fn infinite_loop_hits_the_deadline() {
    let l = Limits {
        fuel: stardust_proto::task::MAX_SAFE_INTEGER,
        wall_ms: 300,
        ..limits()
    };
    let started = Instant::now();
    let out = run_with("infinite_loop.wasm", b"", &[], 0, l);
    assert_eq!(out.report.status, Status::DeadlineExceeded);
    // Generous bound: the point is that it stops, not how fast (speed lives in benchmarks).
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn memory_bomb_is_out_of_memory() {
    let l = Limits {
        memory_bytes: 16 << 20,
        ..limits()
    };
    let out = run_with("memory_bomb.wasm", b"", &[], 0, l);
    assert_eq!(out.report.status, Status::OutOfMemory, "{:?}", out.report);
    assert_eq!(text(&out), "", "the guest never saw malloc fail");
}

#[test]
fn oversized_initial_memory_is_out_of_memory() {
    let wasm =
        wat::parse_str(r#"(module (memory (export "memory") 100) (func (export "_start")))"#)
            .expect("wat");
    let l = Limits {
        memory_bytes: 1 << 20,
        ..limits()
    };
    let task = Task {
        input: Arc::from(&b""[..]),
        args: &[],
        seed: 0,
        limits: l,
    };
    assert_eq!(
        sandbox().run_unmetered(&wasm, &task).report.status,
        Status::OutOfMemory
    );
}

#[test]
fn deep_recursion_overflows_the_stack() {
    let out = run("deep_recursion.wasm");
    assert_eq!(out.report.status, Status::Trap);
    assert_eq!(out.report.trap, Some(TrapKind::StackOverflow));
}

#[test]
fn output_flood_is_capped() {
    let l = Limits {
        output_bytes: 4096,
        ..limits()
    };
    let out = run_with("output_flood.wasm", b"", &[], 0, l);
    assert_eq!(out.report.status, Status::OutputTooLarge);
    assert_eq!(out.output.len(), 4096);
    assert!(text(&out).starts_with("line 0 of a flood"));
}

#[test]
fn every_escape_attempt_is_denied() {
    let out = run("escape.wasm");
    assert_eq!(out.report.status, Status::Ok, "{:?}", out.report);
    let t = text(&out);
    assert_eq!(t.lines().count(), 7, "{t}");
    for line in t.lines() {
        assert!(
            line.ends_with(": denied") || line.ends_with(": empty"),
            "escaped: {line}"
        );
    }
}

#[test]
fn clocks_and_random_are_deterministic_per_seed() {
    let a = run_with("clock_random.wasm", b"", &[], 1, limits());
    let b = run_with("clock_random.wasm", b"", &[], 1, limits());
    let c = run_with("clock_random.wasm", b"", &[], 2, limits());
    assert_eq!(a.report.status, Status::Ok);
    assert_eq!(a.output, b.output);
    let (ta, tc) = (text(&a), text(&c));
    assert!(ta.starts_with("realtime 1704067200."), "{ta}");
    assert_eq!(
        ta.lines().next(),
        tc.lines().next(),
        "clocks do not depend on the seed"
    );
    assert_ne!(ta.lines().nth(1), tc.lines().nth(1), "random bytes do");
}

#[test]
fn division_by_zero_traps() {
    let out = run("divide_by_zero.wasm");
    assert_eq!(out.report.status, Status::Trap);
    assert_eq!(out.report.trap, Some(TrapKind::IntegerDivisionByZero));
}

#[test]
fn nan_bits_are_canonical() {
    let out = run("nan.wat");
    assert_eq!(out.report.status, Status::Ok);
    let canonical = 0x7ff8_0000_0000_0000u64.to_le_bytes();
    assert_eq!(out.output[..8], canonical);
    assert_eq!(out.output[8..], canonical);
}

#[test]
fn nan_bits_are_canonical_through_stores_copysign_and_vectors() {
    // 0/0 computed at run time (x86 produces the negative NaN 0xfff8...): stored directly,
    // used as a copysign sign, and as vector lanes.
    let wasm = wat::parse_str(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (global $z (mut f64) (f64.const 0))
          (global $zf (mut f32) (f32.const 0))
          (func (export "_start")
            (f64.store (i32.const 16) (f64.div (global.get $z) (global.get $z)))
            (f64.store (i32.const 24) (f64.copysign (f64.const 1) (f64.div (global.get $z) (global.get $z))))
            (v128.store (i32.const 32)
              (f32x4.div (f32x4.splat (global.get $zf)) (f32x4.splat (global.get $zf))))
            (v128.store (i32.const 48) (f32x4.splat (f32.div (global.get $zf) (global.get $zf))))
            (i32.store (i32.const 0) (i32.const 16))
            (i32.store (i32.const 4) (i32.const 48))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .expect("wat");
    let task = Task {
        input: Arc::from(&b""[..]),
        args: &[],
        seed: 0,
        limits: limits(),
    };
    let out = sandbox().run_unmetered(&wasm, &task);
    assert_eq!(out.report.status, Status::Ok);
    let mut expected = Vec::new();
    expected.extend_from_slice(&0x7ff8_0000_0000_0000u64.to_le_bytes());
    expected.extend_from_slice(&1.0f64.to_le_bytes());
    for _ in 0..8 {
        expected.extend_from_slice(&0x7fc0_0000u32.to_le_bytes());
    }
    assert_eq!(out.output, expected);
}

#[test]
fn invalid_modules_are_reported_not_run() {
    for (name, needle) in [
        ("unknown_import.wat", "unknown import env.launch_missiles"),
        ("no_start.wat", "_start"),
        ("invalid.bin", "invalid module"),
    ] {
        let out = run(name);
        assert_eq!(out.report.status, Status::InvalidModule, "{name}");
        let detail = out.report.detail.unwrap_or_default();
        assert!(detail.contains(needle), "{name}: {detail}");
        assert_eq!(out.report.fuel_used, 0);
    }
}

#[test]
fn unmetered_bytes_are_refused_by_load() {
    assert_eq!(
        sandbox().load(&program("hello.wasm")).err(),
        Some(LoadError::NotMetered)
    );
}

#[test]
fn wasi_import_with_wrong_type_is_refused() {
    let wasm = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32)))
            (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .expect("wat");
    let metered = stardust_meter::instrument(&wasm).expect("meter");
    assert!(matches!(
        sandbox().load(&metered),
        Err(LoadError::BadImportType { .. })
    ));
}

#[test]
fn bad_limits_are_refused() {
    let out = run_with(
        "hello.wasm",
        b"",
        &[],
        0,
        Limits {
            fuel: 0,
            ..limits()
        },
    );
    assert_eq!(out.report.status, Status::InvalidModule);
    assert!(out.report.detail.unwrap_or_default().contains("fuel"));
}

#[test]
fn compiled_modules_survive_a_restart_via_the_disk_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metered = stardust_meter::instrument(&program("hello.wasm")).expect("meter");
    let id = ContentId::of(&metered);
    let config = Config {
        max_instances: 2,
        cache_dir: Some(dir.path().to_path_buf()),
        ..Config::default()
    };
    let task = Task {
        input: Arc::from(&b"x"[..]),
        args: &[],
        seed: 0,
        limits: limits(),
    };
    let first = {
        let s = Sandbox::new(config.clone()).expect("sandbox");
        s.run_bytes(&metered, &task)
    };
    let file = dir.path().join(format!("{}.cwasm", id.to_hex()));
    assert!(file.exists(), "compiled module written to the cache");
    // A corrupted cache file is discarded and the module recompiled.
    let second = {
        let s = Sandbox::new(config.clone()).expect("sandbox");
        s.run_bytes(&metered, &task)
    };
    assert_eq!(first.report.fingerprint(), second.report.fingerprint());
    std::fs::write(&file, b"garbage").expect("corrupt");
    let third = Sandbox::new(config)
        .expect("sandbox")
        .run_bytes(&metered, &task);
    assert_eq!(first.report.fingerprint(), third.report.fingerprint());
}

#[test]
fn memory_cache_is_bounded() {
    let s = Sandbox::new(Config {
        max_instances: 2,
        memory_cache_entries: 2,
        ..Config::default()
    })
    .expect("sandbox");
    for i in 0..4 {
        let wasm = wat::parse_str(format!(
            r#"(module (memory (export "memory") 1) (func (export "_start") (drop (i32.const {i}))))"#
        ))
        .expect("wat");
        s.load(&stardust_meter::instrument(&wasm).expect("meter"))
            .expect("load");
    }
    assert_eq!(s.cache.lock().expect("lock").entries.len(), 2);
}

/// The vectors of docs/protocol.md, section 11, that the sandbox defines.
#[test]
fn protocol_vectors() {
    let doc = include_str!("../../../docs/protocol.md");
    let vector = |name: &str| {
        let prefix = format!("{name}: ");
        doc.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_string))
            .expect("vector in docs")
    };
    let mut r = wasi::SplitMix64::new(7);
    let outputs: Vec<String> = (0..3).map(|_| r.next_u64().to_string()).collect();
    assert_eq!(
        outputs.join(" "),
        vector("splitmix64(seed 7), first three outputs")
    );
    let mut buf = [0u8; 11];
    wasi::SplitMix64::new(7).fill(&mut buf);
    let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, vector("random_get(seed 7, 11 bytes)"));
    assert_eq!(vector("fuel_used(worked example of section 6)"), "73");
}
