;; Writes the bit pattern of a NaN produced by arithmetic. NaN payloads differ between
;; CPUs unless canonicalized; the sandbox canonicalizes them, so every node prints the same.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $x (mut f64) (f64.const 0))
  (func (export "_start")
    ;; 0/0 computed at run time from a global, so no compiler folds it.
    (i64.store (i32.const 16)
      (i64.reinterpret_f64 (f64.div (global.get $x) (global.get $x))))
    (i64.store (i32.const 24)
      (i64.reinterpret_f64 (f64.sqrt (f64.const -1))))
    ;; iovec { buf = 16, len = 16 } at 0
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
