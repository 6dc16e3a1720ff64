;; Imports a function outside WASI preview 1: invalid_module.
(module
  (import "env" "launch_missiles" (func $launch))
  (memory (export "memory") 1)
  (func (export "_start") (call $launch)))
