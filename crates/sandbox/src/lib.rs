//! The Stardust sandbox: runs metered WASI preview 1 command modules under wasmtime, deny
//! by default and deterministic.
//!
//! ```text
//!  metered bytes ──load──▶ Prepared (compiled, imports checked; cached in memory and on disk)
//!                              │
//!  input, args, seed, limits ──run──▶ RunOutput { report (status, fuel, output id), output, stderr }
//! ```
//!
//! - No filesystem, network, environment or host stdio: see [`wasi`].
//! - Limits: metered fuel (the counter `stardust-meter` injects), a memory cap, a wall-clock
//!   deadline (epoch interruption) and an output cap. Each ends a run with its own
//!   [`Status`]; nothing a guest does makes the host panic or fail.
//! - Determinism per wasmtime's recipe: canonical NaNs (done by the metering rewrite, so a
//!   browser's engine gets them too), no threads, no relaxed SIMD;
//!   clocks and randomness derive from the task seed. The same module, input, args, seed and
//!   limits give the same [`RunReport::fingerprint`] on every run and every machine.
//! - Compiled modules are cached by content id, in memory (bounded) and optionally on disk;
//!   instances come from wasmtime's pooling allocator.
//!
//! This is the only crate of the workspace that depends on wasmtime.

#![deny(missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stardust_meter::{FUEL_EXPORT, MEMORY_LIMIT_EXPORT, OOM_EXPORT};
use stardust_proto::content::ContentId;
use stardust_proto::task::{Limits, RunReport, Status, TrapKind};
use wasmtime::{
    Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module, OptLevel,
    PoolingAllocationConfig, Store, Trap, Val,
};

pub mod wasi;

use wasi::{Host, HostStop};

/// Sandbox settings. Defaults are listed on each field.
#[derive(Debug, Clone)]
pub struct Config {
    /// Instances that may exist at once (pooling allocator slots). Default 64.
    pub max_instances: u32,
    /// The largest memory cap any task may ask for, bytes. Default 4 GiB.
    pub max_memory_bytes: u64,
    /// Directory for compiled modules kept across restarts. Default none (memory only).
    pub cache_dir: Option<PathBuf>,
    /// Compiled modules kept in memory. Default 64.
    pub memory_cache_entries: usize,
    /// Resolution of wall-clock deadlines. Default 5 ms.
    pub epoch_tick: Duration,
    /// WebAssembly stack size, bytes. Default 1 MiB.
    pub max_stack_bytes: usize,
    /// Bytes of stderr kept per run for diagnostics. Default 64 KiB.
    pub stderr_cap: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_instances: 64,
            max_memory_bytes: Limits::MAX_MEMORY_BYTES,
            cache_dir: None,
            memory_cache_entries: 64,
            epoch_tick: Duration::from_millis(5),
            max_stack_bytes: 1 << 20,
            stderr_cap: 64 << 10,
        }
    }
}

/// The sandbox could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NewError {
    /// wasmtime refused the configuration.
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
    /// The cache directory cannot be created.
    #[error("cannot create the module cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a module cannot be loaded; reported to clients as `invalid_module`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The module lacks the metering marker and counter (run it through
    /// `stardust_meter::instrument` first).
    #[error("module is not metered")]
    NotMetered,
    /// Not a valid module for this engine.
    #[error("invalid module: {0}")]
    Invalid(String),
    /// An import outside WASI preview 1.
    #[error("unknown import {module}.{name}")]
    UnknownImport {
        /// Import module.
        module: String,
        /// Import name.
        name: String,
    },
    /// A WASI import with the wrong type.
    #[error("import {module}.{name} has the wrong type")]
    BadImportType {
        /// Import module.
        module: String,
        /// Import name.
        name: String,
    },
    /// No `_start` function of type `() -> ()`.
    #[error("missing `_start` export (a WASI command module is required)")]
    MissingStart,
    /// Imports WASI but exports no memory named `memory`.
    #[error("module imports WASI but exports no memory named \"memory\"")]
    MissingMemory,
}

/// A compiled, checked module ready to instantiate.
#[derive(Clone)]
pub struct Prepared {
    id: ContentId,
    pre: InstancePre<Host>,
    min_memory_pages: u64,
}

impl Prepared {
    /// Content id of the metered bytes.
    pub fn id(&self) -> ContentId {
        self.id
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// The report replicas compare and nodes sign.
    pub report: RunReport,
    /// The stdout bytes (at most the output cap).
    pub output: Vec<u8>,
    /// The first bytes of stderr, for diagnostics; not part of the result.
    pub stderr: Vec<u8>,
}

/// One task's inputs.
#[derive(Debug, Clone)]
pub struct Task<'a> {
    /// The stdin bytes.
    pub input: Arc<[u8]>,
    /// Arguments after `argv[0]`.
    pub args: &'a [String],
    /// Seed of the deterministic random source.
    pub seed: u64,
    /// Limits.
    pub limits: Limits,
}

/// Memory backstop behind the metered grow check (also catches an oversized initial memory).
pub(crate) struct Limiter {
    max_bytes: usize,
    hit: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Largest table a guest may grow.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The sandbox: an engine, the WASI linker, the module cache and the deadline ticker.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<Host>,
    config: Config,
    cache: Mutex<Lru>,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Bounded in-memory cache of compiled modules, least recently used evicted first.
struct Lru {
    cap: usize,
    clock: u64,
    entries: HashMap<ContentId, (Prepared, u64)>,
}

impl Lru {
    fn get(&mut self, id: &ContentId) -> Option<Prepared> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(id).map(|(p, used)| {
            *used = clock;
            p.clone()
        })
    }

    fn put(&mut self, p: Prepared) {
        if self.cap == 0 {
            return;
        }
        self.clock += 1;
        if self.entries.len() >= self.cap
            && !self.entries.contains_key(&p.id)
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id)
        {
            self.entries.remove(&oldest);
        }
        self.entries.insert(p.id, (p, self.clock));
    }
}

impl Sandbox {
    /// Creates the engine and starts the deadline ticker.
    pub fn new(config: Config) -> Result<Self, NewError> {
        let engine_err = |e: wasmtime::Error| NewError::Engine(e.to_string());
        let mut wc = wasmtime::Config::new();
        wc.cranelift_opt_level(OptLevel::Speed)
            // NaNs are canonicalized by the metering rewrite where they become observable
            // (stardust_meter::nan), which every engine honours; doing it again per
            // arithmetic instruction here would only cost time.
            .cranelift_nan_canonicalization(false)
            .relaxed_simd_deterministic(true)
            .wasm_relaxed_simd(false)
            // Threads are compiled out (wasmtime's `threads` feature is off).
            .wasm_multi_memory(false)
            .wasm_memory64(false)
            .wasm_tail_call(false)
            .wasm_extended_const(false)
            .wasm_wide_arithmetic(false)
            .wasm_custom_page_sizes(false)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_stack_bytes);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances)
            .max_memory_size(config.max_memory_bytes as usize)
            .table_elements(MAX_TABLE_ELEMENTS);
        wc.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wc).map_err(engine_err)?;
        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker).map_err(engine_err)?;
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|source| NewError::CacheDir {
                path: dir.clone(),
                source,
            })?;
        }
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("stardust-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| NewError::Engine(format!("cannot start the deadline ticker: {e}")))?;
        }
        let cache = Mutex::new(Lru {
            cap: config.memory_cache_entries,
            clock: 0,
            entries: HashMap::new(),
        });
        Ok(Self {
            engine,
            linker,
            config,
            cache,
            ticker_stop,
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The module with metered id `id`, if it is loaded already (no bytes needed: a node
    /// that knows a task's module id skips reading and hashing the module for every task).
    pub fn loaded(&self, id: &ContentId) -> Option<Prepared> {
        self.cache.lock().ok().and_then(|mut c| c.get(id))
    }

    /// Compiles (or fetches from the cache) a metered module and checks its imports and
    /// exports.
    pub fn load(&self, metered: &[u8]) -> Result<Prepared, LoadError> {
        let id = ContentId::of(metered);
        if let Some(p) = self.cache.lock().ok().and_then(|mut c| c.get(&id)) {
            return Ok(p);
        }
        if !stardust_meter::is_metered(metered) {
            return Err(LoadError::NotMetered);
        }
        let module = self.compile_cached(&id, metered)?;
        let prepared = self.check(id, &module)?;
        if let Ok(mut c) = self.cache.lock() {
            c.put(prepared.clone());
        }
        Ok(prepared)
    }

    fn cache_path(&self, id: &ContentId) -> Option<PathBuf> {
        self.config
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{}.cwasm", id.to_hex())))
    }

    fn compile_cached(&self, id: &ContentId, metered: &[u8]) -> Result<Module, LoadError> {
        let path = self.cache_path(id);
        if let Some(path) = &path
            && path.exists()
        {
            {
                match deserialize(&self.engine, path) {
                    Ok(m) => return Ok(m),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "discarding unusable cached module")
                    }
                }
            }
        }
        let module =
            Module::new(&self.engine, metered).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        if let Some(path) = &path
            && let Err(e) = store_compiled(&module, path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the compiled module cache");
        }
        Ok(module)
    }

    fn check(&self, id: ContentId, module: &Module) -> Result<Prepared, LoadError> {
        let mut uses_wasi = false;
        for import in module.imports() {
            let (m, n) = (import.module(), import.name());
            let unknown = || LoadError::UnknownImport {
                module: m.to_string(),
                name: n.to_string(),
            };
            if m != wasi::MODULE {
                return Err(unknown());
            }
            let expected = wasi::signature(&self.engine, n).ok_or_else(unknown)?;
            match import.ty() {
                ExternType::Func(ft) if wasmtime::FuncType::eq(&ft, &expected) => uses_wasi = true,
                _ => {
                    return Err(LoadError::BadImportType {
                        module: m.to_string(),
                        name: n.to_string(),
                    });
                }
            }
        }
        let mut has_start = false;
        let mut min_memory_pages = 0;
        let mut has_memory = false;
        let mut counters = 0;
        for export in module.exports() {
            match (export.name(), export.ty()) {
                ("_start", ExternType::Func(ft)) => {
                    has_start = ft.params().len() == 0 && ft.results().len() == 0
                }
                ("memory", ExternType::Memory(mt)) => {
                    has_memory = true;
                    min_memory_pages = mt.minimum();
                }
                (FUEL_EXPORT | MEMORY_LIMIT_EXPORT | OOM_EXPORT, ExternType::Global(_)) => {
                    counters += 1
                }
                _ => {}
            }
        }
        if counters != 3 {
            return Err(LoadError::NotMetered);
        }
        if !has_start {
            return Err(LoadError::MissingStart);
        }
        if uses_wasi && !has_memory {
            return Err(LoadError::MissingMemory);
        }
        let pre = self
            .linker
            .instantiate_pre(module)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        Ok(Prepared {
            id,
            pre,
            min_memory_pages,
        })
    }

    /// Meters, loads and runs raw (unmetered) module bytes: what `stardust run` does. Every
    /// problem with the module is an `invalid_module` report, never an error.
    pub fn run_unmetered(&self, wasm: &[u8], task: &Task<'_>) -> RunOutput {
        match stardust_meter::instrument(wasm) {
            Ok(metered) => self.run_bytes(&metered, task),
            Err(e) => invalid(e.to_string()),
        }
    }

    /// Loads and runs metered module bytes.
    pub fn run_bytes(&self, metered: &[u8], task: &Task<'_>) -> RunOutput {
        match self.load(metered) {
            Ok(p) => self.run(&p, task),
            Err(e) => invalid(e.to_string()),
        }
    }

    /// Runs one task. Never panics and never fails: every end is a [`Status`].
    pub fn run(&self, module: &Prepared, task: &Task<'_>) -> RunOutput {
        let started = Instant::now();
        let limits = task.limits;
        if let Err(e) = limits.validate() {
            return invalid(format!("bad limits: {e}"));
        }
        let memory_pages = limits.memory_pages();
        let output_cap = limits.output_bytes as usize;
        // The backstop sits at the task's cap, and never above the engine's.
        let max_bytes = limits.memory_bytes.min(self.config.max_memory_bytes) as usize;
        let limiter = Limiter {
            max_bytes,
            hit: false,
        };
        let host = Host::new(
            task.input.clone(),
            task.args,
            task.seed,
            output_cap,
            self.config.stderr_cap,
            limiter,
        );
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limiter);
        let ticks = limits
            .wall_ms
            .div_ceil(self.config.epoch_tick.as_millis().max(1) as u64)
            + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();

        let finish = |store: &mut Store<Host>, end: End| -> RunOutput {
            let remaining = store
                .data()
                .fuel
                .map(|g| g.get(&mut *store).i64().unwrap_or(0));
            let oom = oom_flag(store);
            let host = store.data_mut();
            let output = std::mem::take(&mut host.output);
            let stderr = std::mem::take(&mut host.stderr);
            let limiter_hit = host.limiter.hit;
            let fuel_limit = limits.fuel;
            let (status, trap, exit_code, detail) = match remaining {
                Some(r) if r < 0 => (Status::OutOfFuel, None, None, None),
                _ if oom || limiter_hit => (Status::OutOfMemory, None, None, None),
                _ => classify(end),
            };
            let fuel_used = match remaining {
                Some(r) if r >= 0 => fuel_limit.saturating_sub(r as u64),
                Some(_) => fuel_limit,
                None => 0,
            };
            RunOutput {
                report: RunReport {
                    status,
                    trap,
                    exit_code,
                    fuel_used,
                    output: ContentId::of(&output),
                    output_len: output.len() as u64,
                    wall_ms: started.elapsed().as_millis() as u64,
                    detail,
                },
                output,
                stderr,
            }
        };

        if module.min_memory_pages > u64::from(memory_pages) {
            return finish(&mut store, End::MemoryCap);
        }
        let instance = match module.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => return finish(&mut store, End::Error(e)),
        };
        let globals = (
            instance.get_global(&mut store, FUEL_EXPORT),
            instance.get_global(&mut store, MEMORY_LIMIT_EXPORT),
        );
        let (Some(fuel), Some(memory_limit)) = globals else {
            return invalid(LoadError::NotMetered.to_string());
        };
        let memory = instance.get_memory(&mut store, "memory");
        let set = fuel
            .set(&mut store, Val::I64(limits.fuel as i64))
            .and_then(|()| memory_limit.set(&mut store, Val::I32(memory_pages as i32)));
        if let Err(e) = set {
            return invalid(format!("metering counters are not mutable: {e}"));
        }
        let oom = instance.get_global(&mut store, OOM_EXPORT);
        let host = store.data_mut();
        host.fuel = Some(fuel);
        host.oom = oom;
        host.memory = memory;
        let start = match instance.get_typed_func::<(), ()>(&mut store, "_start") {
            Ok(f) => f,
            Err(_) => return invalid(LoadError::MissingStart.to_string()),
        };
        let end = match start.call(&mut store, ()) {
            Ok(()) => End::Returned,
            Err(e) => End::Error(e),
        };
        finish(&mut store, end)
    }
}

/// True when the metered grow check refused memory (the module's OOM flag is set).
fn oom_flag(store: &mut Store<Host>) -> bool {
    store
        .data()
        .oom
        .is_some_and(|g| g.get(&mut *store).i32().unwrap_or(0) != 0)
}

/// How `_start` ended, before the end-of-run rule.
enum End {
    Returned,
    MemoryCap,
    Error(wasmtime::Error),
}

fn classify(end: End) -> (Status, Option<TrapKind>, Option<i32>, Option<String>) {
    match end {
        End::Returned => (Status::Ok, None, Some(0), None),
        End::MemoryCap => (Status::OutOfMemory, None, None, None),
        End::Error(e) => {
            if let Some(stop) = e.downcast_ref::<HostStop>() {
                return match stop {
                    HostStop::Exit(0) => (Status::Ok, None, Some(0), None),
                    HostStop::Exit(code) => (Status::ExitNonzero, None, Some(*code), None),
                    HostStop::OutputFull => (Status::OutputTooLarge, None, None, None),
                };
            }
            if let Some(trap) = e.downcast_ref::<Trap>() {
                let kind = match trap {
                    Trap::Interrupt => return (Status::DeadlineExceeded, None, None, None),
                    Trap::StackOverflow => TrapKind::StackOverflow,
                    Trap::MemoryOutOfBounds => TrapKind::MemoryOutOfBounds,
                    Trap::TableOutOfBounds => TrapKind::TableOutOfBounds,
                    Trap::IndirectCallToNull => TrapKind::IndirectCallToNull,
                    Trap::BadSignature => TrapKind::BadSignature,
                    Trap::IntegerOverflow => TrapKind::IntegerOverflow,
                    Trap::IntegerDivisionByZero => TrapKind::IntegerDivisionByZero,
                    Trap::BadConversionToInteger => TrapKind::BadConversionToInteger,
                    Trap::UnreachableCodeReached => TrapKind::Unreachable,
                    _ => TrapKind::Other,
                };
                return (Status::Trap, Some(kind), None, None);
            }
            (
                Status::Trap,
                Some(TrapKind::Other),
                None,
                Some(format!("{e:#}")),
            )
        }
    }
}

fn invalid(detail: String) -> RunOutput {
    RunOutput::invalid(detail)
}

impl RunOutput {
    /// The output of a module that could not be run: `invalid_module` with `detail`.
    pub fn invalid(detail: String) -> Self {
        let output = Vec::new();
        Self {
            report: RunReport {
                status: Status::InvalidModule,
                trap: None,
                exit_code: None,
                fuel_used: 0,
                output: ContentId::of(&output),
                output_len: 0,
                wall_ms: 0,
                detail: Some(detail),
            },
            output,
            stderr: Vec::new(),
        }
    }
}

#[allow(
    unsafe_code,
    reason = "loading a compiled module is unsafe; see the safety comment"
)]
fn deserialize(engine: &Engine, path: &Path) -> wasmtime::Result<Module> {
    // SAFETY: `Module::deserialize_file` trusts its input to be a module compiled by this
    // wasmtime. The cache directory is private to this process's data directory (created
    // 0700 by the node), files are written only by `store_compiled` below (atomically, via a
    // rename), and are named by the content id of the metered bytes they were compiled
    // from. wasmtime itself rejects artifacts from another version or configuration.
    unsafe { Module::deserialize_file(engine, path) }
}

fn store_compiled(module: &Module, path: &Path) -> std::io::Result<()> {
    let bytes = module
        .serialize()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests;
