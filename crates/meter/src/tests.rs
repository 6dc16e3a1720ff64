//! Tests of the rewrite itself, run with wasmparser only (no engine). The sandbox crate runs
//! metered modules end to end.

use super::*;

fn wat(src: &str) -> Vec<u8> {
    wat::parse_str(src).expect("valid wat")
}

fn exports(wasm: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for p in Parser::new(0).parse_all(wasm) {
        if let Ok(Payload::ExportSection(r)) = p {
            for e in r {
                out.push(e.expect("export").name.to_string());
            }
        }
    }
    out
}

#[test]
fn adds_counter_exports_and_marker() {
    let m = wat(r#"(module (memory 1) (func (export "_start") (local i32)
        (loop (br_if 0 (i32.eqz (local.get 0))))))"#);
    let out = instrument(&m).expect("meters");
    assert!(is_metered(&out));
    assert!(!is_metered(&m));
    assert_eq!(
        exports(&out),
        ["_start", FUEL_EXPORT, MEMORY_LIMIT_EXPORT, OOM_EXPORT]
    );
    assert_eq!(instrument(&out), Err(MeterError::AlreadyMetered));
}

#[test]
fn rewrite_is_deterministic() {
    let m = wat(r#"(module (memory 1) (func (export "_start")
        (drop (memory.grow (i32.const 1)))
        (memory.fill (i32.const 0) (i32.const 0) (i32.const 100))))"#);
    assert_eq!(instrument(&m), instrument(&m));
}

#[test]
fn modules_without_globals_exports_or_memory_are_completed() {
    // No memory, no global, no export section: the rewrite inserts them in canonical order.
    let m = wat(r#"(module (func $f (nop)))"#);
    let out = instrument(&m).expect("meters");
    assert_eq!(
        exports(&out),
        [FUEL_EXPORT, MEMORY_LIMIT_EXPORT, OOM_EXPORT]
    );
    // Empty module.
    let out = instrument(&wat("(module)")).expect("meters");
    assert!(is_metered(&out));
}

#[test]
fn refusals_are_typed() {
    assert!(matches!(
        instrument(b"not wasm"),
        Err(MeterError::Invalid(_))
    ));
    let reserved = wat(r#"(module (func (export "__stardust_fuel")))"#);
    assert_eq!(
        instrument(&reserved),
        Err(MeterError::ReservedName("__stardust_fuel".into()))
    );
    let start = wat(r#"(module (func $s) (start $s))"#);
    assert!(matches!(
        instrument(&start),
        Err(MeterError::Unsupported(_))
    ));
    let imported_memory = wat(r#"(module (import "env" "memory" (memory 1)))"#);
    assert!(matches!(
        instrument(&imported_memory),
        Err(MeterError::Unsupported(_))
    ));
    // Threads (shared memory) are outside the accepted feature set.
    let shared = wat(r#"(module (memory 1 1 shared))"#);
    assert!(matches!(instrument(&shared), Err(MeterError::Invalid(_))));
}

#[test]
fn segment_costs_follow_the_table() {
    // Entry segment: i32.const, drop, then the loop instruction itself (boundary) = 3.
    // Loop header segment: local.get, br_if = 2 (checked). After br_if: end = 1.
    // After end: end (function) = 1.
    let m = wat(r#"(module (func (local i32) i32.const 1 drop (loop local.get 0 br_if 0) ))"#);
    let out = instrument(&m).expect("meters");
    let mut charges = Vec::new();
    for p in Parser::new(0).parse_all(&out) {
        if let Ok(Payload::CodeSectionEntry(body)) = p {
            let mut r = body.get_operators_reader().expect("ops");
            let mut prev_get_fuel = false;
            while !r.eof() {
                let op = r.read().expect("op");
                match op {
                    Operator::GlobalGet { global_index: 0 } => prev_get_fuel = true,
                    Operator::I64Const { value } if prev_get_fuel => {
                        charges.push(value);
                        prev_get_fuel = false;
                    }
                    _ => prev_get_fuel = false,
                }
            }
        }
    }
    assert_eq!(charges, [3, 2, 1, 1]);
}
