//! Deterministic, engine-independent metering for WebAssembly modules.
//!
//! Metering is money, so the fuel count of a module + input must be identical on every run,
//! every machine and every engine (wasmtime on a native node, the JavaScript engine of a
//! browser node). Engine fuel (wasmtime's `consume_fuel`) is specific to one engine, so
//! Stardust instead rewrites the module **once, at the domain**, injecting an explicit fuel
//! counter into the code. Any engine that runs the rewritten module computes the same count.
//! The rewrite is itself deterministic: the same input bytes give the same output bytes.
//!
//! What [`instrument`] adds (normative text: `docs/protocol.md`, "Metering"):
//!
//! - an exported mutable `i64` global [`FUEL_EXPORT`]: the host stores the fuel limit in it
//!   before calling `_start` and reads what is left afterwards;
//! - at the start of every *segment* (function entry, loop header, after `if`, `else`,
//!   `end`, `br`, `br_if`, `br_table`, `return`, `unreachable`) a subtraction of the segment's
//!   static cost ([`cost::op`]) from the counter; at function entries and loop headers it then
//!   traps with `unreachable` if the counter went negative. Every unbounded execution passes
//!   a check, so a module cannot run past its fuel by more than one segment;
//! - before each instruction whose work depends on an operand (`memory.fill`, `memory.copy`,
//!   `memory.init`, `table.*` bulk ops, `memory.grow`), a dynamic charge from that operand
//!   ([`cost::dynamic`]);
//! - an exported mutable `i32` global [`MEMORY_LIMIT_EXPORT`] (pages) and an exported `i32`
//!   global [`OOM_EXPORT`]: every `memory.grow` is routed through an injected function that
//!   sets the flag and traps when the memory would exceed the limit;
//! - a custom section [`MARKER_SECTION`] holding [`MARKER_VERSION`].
//!
//! The host's rule at the end of a run, whatever ended it: if the counter is negative the
//! outcome is `out_of_fuel` (fuel used = limit); else if the OOM flag is set it is
//! `out_of_memory`; else the outcome stands and fuel used = limit − counter.
//!
//! Pure logic: no I/O.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use wasm_encoder::reencode::{Error as ReencodeError, Reencode, RoundtripReencoder};
use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, ExportKind, ExportSection, Function, FunctionSection,
    GlobalSection, GlobalType, Instruction, Module, SectionId, TypeSection, ValType,
};
use wasmparser::{Operator, Parser, Payload, TypeRef, Validator, WasmFeatures};

pub mod cost;
pub mod nan;

/// Export name of the fuel counter (mutable `i64` global).
pub const FUEL_EXPORT: &str = "__stardust_fuel";
/// Export name of the memory limit in 64 KiB pages (mutable `i32` global).
pub const MEMORY_LIMIT_EXPORT: &str = "__stardust_memory_limit";
/// Export name of the out-of-memory flag (mutable `i32` global, 1 once a grow was refused).
pub const OOM_EXPORT: &str = "__stardust_oom";
/// Prefix reserved for Stardust's own exports; input modules may not use it.
pub const RESERVED_PREFIX: &str = "__stardust";
/// Name of the custom section marking a metered module.
pub const MARKER_SECTION: &str = "stardust.meter";
/// Content of the marker section: the metering scheme version.
pub const MARKER_VERSION: &[u8] = b"v1";

/// The WebAssembly features a Stardust module may use: WebAssembly 2.0 (MVP, mutable globals,
/// sign extension, saturating float-to-int, multi-value, bulk memory, reference types, SIMD).
/// Threads, relaxed SIMD, memory64, multi-memory, exceptions, tail calls and GC are refused:
/// they are either not deterministic across engines or not metered.
pub fn features() -> WasmFeatures {
    WasmFeatures::WASM2
}

/// Why a module cannot be metered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeterError {
    /// Not a valid WebAssembly module under [`features`].
    #[error("invalid module: {0}")]
    Invalid(String),
    /// The module is valid but uses something Stardust does not run.
    #[error("unsupported module: {0}")]
    Unsupported(String),
    /// The module already carries the metering marker.
    #[error("module is already metered")]
    AlreadyMetered,
    /// The module exports a name under [`RESERVED_PREFIX`].
    #[error("export {0:?} uses the reserved prefix {RESERVED_PREFIX:?}")]
    ReservedName(String),
}

/// True when `wasm` carries the metering marker of this scheme version.
pub fn is_metered(wasm: &[u8]) -> bool {
    marker(wasm).is_some_and(|v| v == MARKER_VERSION)
}

fn marker(wasm: &[u8]) -> Option<Vec<u8>> {
    for payload in Parser::new(0).parse_all(wasm) {
        match payload {
            Ok(Payload::CustomSection(c)) if c.name() == MARKER_SECTION => {
                return Some(c.data().to_vec());
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Validates `wasm` and returns the metered module.
pub fn instrument(wasm: &[u8]) -> Result<Vec<u8>, MeterError> {
    Validator::new_with_features(features())
        .validate_all(wasm)
        .map_err(|e| MeterError::Invalid(e.to_string()))?;
    if marker(wasm).is_some() {
        return Err(MeterError::AlreadyMetered);
    }
    let info = Info::scan(wasm)?;
    let mut meter = Meter::new(info);
    let mut module = Module::new();
    meter
        .parse_core_module(&mut module, Parser::new(0), wasm)
        .map_err(|e| match e {
            ReencodeError::UserError(e) => e,
            other => MeterError::Invalid(format!("{other:?}")),
        })?;
    let out = module.finish();
    // The rewrite must itself be valid; a failure here is a bug in this crate, reported as
    // unsupported rather than handed to an engine.
    Validator::new_with_features(features())
        .validate_all(&out)
        .map_err(|e| MeterError::Unsupported(format!("metered module failed validation: {e}")))?;
    Ok(out)
}

/// What the rewrite needs to know before it starts.
#[derive(Debug, Default)]
struct Info {
    /// Parameter count of every type, by type index.
    type_params: Vec<u32>,
    /// Type index of every defined function.
    func_types: Vec<u32>,
    imported_funcs: u32,
    globals: u32,
    has_memory: bool,
}

impl Info {
    fn scan(wasm: &[u8]) -> Result<Self, MeterError> {
        let mut info = Info::default();
        let invalid = |e: wasmparser::BinaryReaderError| MeterError::Invalid(e.to_string());
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(invalid)? {
                Payload::TypeSection(reader) => {
                    for ty in reader.into_iter_err_on_gc_types() {
                        info.type_params
                            .push(ty.map_err(invalid)?.params().len() as u32);
                    }
                }
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        let import = import.map_err(invalid)?;
                        match import.ty {
                            TypeRef::Func(_) | TypeRef::FuncExact(_) => info.imported_funcs += 1,
                            TypeRef::Global(_) => info.globals += 1,
                            TypeRef::Memory(_) => {
                                return Err(MeterError::Unsupported(format!(
                                    "imported memory {}.{} (a module must define its own memory)",
                                    import.module, import.name
                                )));
                            }
                            TypeRef::Table(_) | TypeRef::Tag(_) => {}
                        }
                    }
                }
                Payload::FunctionSection(reader) => {
                    for ty in reader {
                        info.func_types.push(ty.map_err(invalid)?);
                    }
                }
                Payload::GlobalSection(reader) => info.globals += reader.count(),
                Payload::MemorySection(reader) => info.has_memory = reader.count() > 0,
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export.map_err(invalid)?;
                        if export.name.starts_with(RESERVED_PREFIX) {
                            return Err(MeterError::ReservedName(export.name.to_string()));
                        }
                    }
                }
                Payload::StartSection { .. } => {
                    return Err(MeterError::Unsupported(
                        "start section (a WASI command exports `_start` instead)".into(),
                    ));
                }
                Payload::CustomSection(c) if c.name() == MARKER_SECTION => {
                    return Err(MeterError::AlreadyMetered);
                }
                _ => {}
            }
        }
        Ok(info)
    }
}

/// Canonical position of each non-custom section, for inserting missing ones.
fn position(id: SectionId) -> u8 {
    match id {
        SectionId::Type => 1,
        SectionId::Import => 2,
        SectionId::Function => 3,
        SectionId::Table => 4,
        SectionId::Memory => 5,
        SectionId::Tag => 6,
        SectionId::Global => 7,
        SectionId::Export => 8,
        SectionId::Start => 9,
        SectionId::Element => 10,
        SectionId::DataCount => 11,
        SectionId::Code => 12,
        SectionId::Data => 13,
        _ => 0,
    }
}

/// The sections the rewrite appends to, in canonical order.
const TOUCHED: [SectionId; 5] = [
    SectionId::Type,
    SectionId::Function,
    SectionId::Global,
    SectionId::Export,
    SectionId::Code,
];

struct Meter {
    info: Info,
    /// Sections of `TOUCHED` already written.
    written: [bool; 5],
    /// Index of the next defined function body.
    next_body: usize,
    fuel: u32,
    memory_limit: u32,
    oom: u32,
    /// The injected grow function, when the module has a memory.
    grow_func: Option<u32>,
    grow_type: u32,
}

impl Meter {
    fn new(info: Info) -> Self {
        let fuel = info.globals;
        let grow_type = info.type_params.len() as u32;
        let grow_func = info
            .has_memory
            .then(|| info.imported_funcs + info.func_types.len() as u32);
        Self {
            info,
            written: [false; 5],
            next_body: 0,
            fuel,
            memory_limit: fuel + 1,
            oom: fuel + 2,
            grow_func,
            grow_type,
        }
    }

    fn mark(&mut self, id: SectionId) {
        if let Some(i) = TOUCHED.iter().position(|t| *t == id) {
            self.written[i] = true;
        }
    }

    fn add_types(&self, types: &mut TypeSection) {
        if self.grow_func.is_some() {
            types.ty().function([ValType::I32], [ValType::I32]);
        }
    }

    fn add_functions(&self, functions: &mut FunctionSection) {
        if self.grow_func.is_some() {
            functions.function(self.grow_type);
        }
    }

    fn add_globals(&self, globals: &mut GlobalSection) {
        let mutable = |val_type| GlobalType {
            val_type,
            mutable: true,
            shared: false,
        };
        globals.global(mutable(ValType::I64), &ConstExpr::i64_const(0));
        globals.global(mutable(ValType::I32), &ConstExpr::i32_const(0));
        globals.global(mutable(ValType::I32), &ConstExpr::i32_const(0));
    }

    fn add_exports(&self, exports: &mut ExportSection) {
        exports.export(FUEL_EXPORT, ExportKind::Global, self.fuel);
        exports.export(MEMORY_LIMIT_EXPORT, ExportKind::Global, self.memory_limit);
        exports.export(OOM_EXPORT, ExportKind::Global, self.oom);
    }

    fn add_code(&self, code: &mut CodeSection) {
        if self.grow_func.is_none() {
            return;
        }
        // (func (param $delta i32) (result i32)
        //   (if (i64.gt_u (i64.add (memory.size) (delta)) (limit))
        //     (then (global.set $oom (i32.const 1)) unreachable))
        //   (memory.grow (local.get $delta)))
        let mut f = Function::new([]);
        f.instructions()
            .memory_size(0)
            .i64_extend_i32_u()
            .local_get(0)
            .i64_extend_i32_u()
            .i64_add()
            .global_get(self.memory_limit)
            .i64_extend_i32_u()
            .i64_gt_u()
            .if_(BlockType::Empty)
            .i32_const(1)
            .global_set(self.oom)
            .unreachable()
            .end()
            .local_get(0)
            .memory_grow(0)
            .end();
        code.function(&f);
    }

    /// Subtracts `cost` from the counter; with `check`, traps when it went negative.
    fn charge(&self, f: &mut Function, cost: u64, check: bool, scratch64: u32) {
        let mut sink = f.instructions();
        sink.global_get(self.fuel).i64_const(cost as i64).i64_sub();
        if check {
            sink.local_tee(scratch64)
                .global_set(self.fuel)
                .local_get(scratch64)
                .i64_const(0)
                .i64_lt_s()
                .if_(BlockType::Empty)
                .unreachable()
                .end();
        } else {
            sink.global_set(self.fuel);
        }
    }

    /// Charges for the operand-dependent work of `op`, whose count operand (an `i32`) is on
    /// top of the stack and stays there.
    fn charge_dynamic(&self, f: &mut Function, op: &Operator<'_>, scratch32: u32) {
        let Some(unit) = cost::dynamic(op) else {
            return;
        };
        let mut sink = f.instructions();
        sink.local_tee(scratch32)
            .global_get(self.fuel)
            .local_get(scratch32)
            .i64_extend_i32_u();
        match unit {
            cost::Dynamic::PerUnitShl(k) => sink.i64_const(i64::from(k)).i64_shl(),
            cost::Dynamic::PerUnitShr(k) => sink.i64_const(i64::from(k)).i64_shr_u(),
        };
        sink.i64_sub().global_set(self.fuel);
    }
}

impl Reencode for Meter {
    type Error = MeterError;

    fn intersperse_section_hook(
        &mut self,
        module: &mut Module,
        after: Option<SectionId>,
        before: Option<SectionId>,
    ) -> Result<(), ReencodeError<MeterError>> {
        // Insert any section the rewrite needs that the module lacks, in canonical order.
        let lo = after.map_or(0, position);
        let hi = before.map_or(u8::MAX, position);
        for (i, id) in TOUCHED.into_iter().enumerate() {
            let p = position(id);
            if self.written[i] || p <= lo || p >= hi {
                continue;
            }
            self.written[i] = true;
            match id {
                SectionId::Type if self.grow_func.is_some() => {
                    let mut s = TypeSection::new();
                    self.add_types(&mut s);
                    module.section(&s);
                }
                SectionId::Function if self.grow_func.is_some() => {
                    let mut s = FunctionSection::new();
                    self.add_functions(&mut s);
                    module.section(&s);
                }
                SectionId::Global => {
                    let mut s = GlobalSection::new();
                    self.add_globals(&mut s);
                    module.section(&s);
                }
                SectionId::Export => {
                    let mut s = ExportSection::new();
                    self.add_exports(&mut s);
                    module.section(&s);
                }
                SectionId::Code if self.grow_func.is_some() => {
                    let mut s = CodeSection::new();
                    self.add_code(&mut s);
                    module.section(&s);
                }
                _ => {}
            }
        }
        if before.is_none() {
            module.section(&wasm_encoder::CustomSection {
                name: MARKER_SECTION.into(),
                data: MARKER_VERSION.into(),
            });
        }
        Ok(())
    }

    fn parse_type_section(
        &mut self,
        types: &mut TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> Result<(), ReencodeError<MeterError>> {
        self.mark(SectionId::Type);
        RoundtripReencoder
            .parse_type_section(types, section)
            .map_err(user_err)?;
        self.add_types(types);
        Ok(())
    }

    fn parse_function_section(
        &mut self,
        functions: &mut FunctionSection,
        section: wasmparser::FunctionSectionReader<'_>,
    ) -> Result<(), ReencodeError<MeterError>> {
        self.mark(SectionId::Function);
        RoundtripReencoder
            .parse_function_section(functions, section)
            .map_err(user_err)?;
        self.add_functions(functions);
        Ok(())
    }

    fn parse_global_section(
        &mut self,
        globals: &mut GlobalSection,
        section: wasmparser::GlobalSectionReader<'_>,
    ) -> Result<(), ReencodeError<MeterError>> {
        self.mark(SectionId::Global);
        RoundtripReencoder
            .parse_global_section(globals, section)
            .map_err(user_err)?;
        self.add_globals(globals);
        Ok(())
    }

    fn parse_export_section(
        &mut self,
        exports: &mut ExportSection,
        section: wasmparser::ExportSectionReader<'_>,
    ) -> Result<(), ReencodeError<MeterError>> {
        self.mark(SectionId::Export);
        RoundtripReencoder
            .parse_export_section(exports, section)
            .map_err(user_err)?;
        self.add_exports(exports);
        Ok(())
    }

    fn parse_code_section(
        &mut self,
        code: &mut CodeSection,
        section: wasmparser::CodeSectionReader<'_>,
    ) -> Result<(), ReencodeError<MeterError>> {
        self.mark(SectionId::Code);
        for body in section {
            self.parse_function_body(code, body?)?;
        }
        self.add_code(code);
        Ok(())
    }

    fn parse_function_body(
        &mut self,
        code: &mut CodeSection,
        body: wasmparser::FunctionBody<'_>,
    ) -> Result<(), ReencodeError<MeterError>> {
        let ty = *self.info.func_types.get(self.next_body).ok_or_else(|| {
            ReencodeError::UserError(MeterError::Invalid("more bodies than functions".into()))
        })?;
        self.next_body += 1;
        let params = *self.info.type_params.get(ty as usize).ok_or_else(|| {
            ReencodeError::UserError(MeterError::Invalid(format!("bad type index {ty}")))
        })?;

        let mut locals = Vec::new();
        let mut declared: u64 = 0;
        for pair in body.get_locals_reader()? {
            let (count, ty) = pair?;
            declared += u64::from(count);
            locals.push((count, RoundtripReencoder.val_type(ty).map_err(user_err)?));
        }
        let first_scratch = u64::from(params) + declared;
        let scratch32 = u32::try_from(first_scratch).map_err(|_| {
            ReencodeError::UserError(MeterError::Unsupported("too many locals".into()))
        })?;
        let scratch = Scratch {
            i32: scratch32,
            i64: scratch32 + 1,
            f32: scratch32 + 2,
            f64: scratch32 + 3,
            v128: scratch32 + 4,
        };
        let scratch64 = scratch.i64;
        for ty in [
            ValType::I32,
            ValType::I64,
            ValType::F32,
            ValType::F64,
            ValType::V128,
        ] {
            locals.push((1, ty));
        }
        let mut f = Function::new(locals);

        let mut reader = body.get_operators_reader()?;
        let mut ops = Vec::new();
        while !reader.eof() {
            ops.push(reader.read()?);
        }
        // cost_from[i]: static cost of the segment that starts at instruction i.
        let mut cost_from = vec![0u64; ops.len()];
        let mut acc = 0u64;
        for (i, op) in ops.iter().enumerate().rev() {
            let c = cost::op(op);
            acc = if cost::ends_segment(op) { c } else { acc + c };
            cost_from[i] = acc;
        }

        if let Some(&first) = cost_from.first() {
            self.charge(&mut f, first, true, scratch64);
        }
        let last = ops.len().saturating_sub(1);
        for (i, op) in ops.into_iter().enumerate() {
            self.charge_dynamic(&mut f, &op, scratch.i32);
            if let Some(c) = nan::before(&op) {
                canonicalize(&mut f, c, &scratch);
            }
            let canon_after = nan::after(&op);
            let boundary = cost::ends_segment(&op);
            let is_loop = matches!(op, Operator::Loop { .. });
            match op {
                Operator::MemoryGrow { .. } => {
                    let grow = self.grow_func.ok_or_else(|| {
                        ReencodeError::UserError(MeterError::Invalid(
                            "memory.grow without a memory".into(),
                        ))
                    })?;
                    f.instruction(&Instruction::Call(grow));
                }
                other => {
                    f.instruction(&self.instruction(other)?);
                }
            }
            if let Some(c) = canon_after {
                canonicalize(&mut f, c, &scratch);
            }
            if boundary && i != last {
                let next = cost_from[i + 1];
                if next > 0 || is_loop {
                    self.charge(&mut f, next, is_loop, scratch64);
                }
            }
        }
        code.function(&f);
        Ok(())
    }
}

/// Scratch locals appended to every function.
struct Scratch {
    i32: u32,
    i64: u32,
    f32: u32,
    f64: u32,
    v128: u32,
}

/// Replaces a NaN on top of the stack by the canonical NaN (lane-wise for vectors).
fn canonicalize(f: &mut Function, canon: nan::Canon, scratch: &Scratch) {
    let mut sink = f.instructions();
    match canon {
        nan::Canon::F32 => {
            // select(canonical, x, x != x)
            sink.local_set(scratch.f32)
                .f32_const(wasm_encoder::Ieee32::new(nan::F32_NAN))
                .local_get(scratch.f32)
                .local_get(scratch.f32)
                .local_get(scratch.f32)
                .f32_ne()
                .select();
        }
        nan::Canon::F64 => {
            sink.local_set(scratch.f64)
                .f64_const(wasm_encoder::Ieee64::new(nan::F64_NAN))
                .local_get(scratch.f64)
                .local_get(scratch.f64)
                .local_get(scratch.f64)
                .f64_ne()
                .select();
        }
        nan::Canon::F32x4 | nan::Canon::F64x2 => {
            // bitselect(canonical, x, x != x), lane-wise
            let splat = if canon == nan::Canon::F32x4 {
                let l = u128::from(nan::F32_NAN);
                l | l << 32 | l << 64 | l << 96
            } else {
                let l = u128::from(nan::F64_NAN);
                l | l << 64
            };
            sink.local_set(scratch.v128)
                .v128_const(splat as i128)
                .local_get(scratch.v128)
                .local_get(scratch.v128)
                .local_get(scratch.v128);
            if canon == nan::Canon::F32x4 {
                sink.f32x4_ne();
            } else {
                sink.f64x2_ne();
            }
            sink.v128_bitselect();
        }
    }
}

fn user_err(e: ReencodeError) -> ReencodeError<MeterError> {
    match e {
        ReencodeError::ParseError(p) => ReencodeError::ParseError(p),
        other => ReencodeError::UserError(MeterError::Invalid(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests;
