;; A library, not a command: no `_start`, so invalid_module.
(module
  (memory (export "memory") 1)
  (func (export "compute") (result i32) (i32.const 42)))
