//! NaN canonicalization, part of the rewrite (scheme v1).
//!
//! IEEE 754 leaves the sign and payload of a NaN produced by arithmetic up to the hardware
//! (x86 gives `0xfff8…`, ARM `0x7ff8…`), so a module that looks at those bits would give
//! different outputs on different nodes. Engines can canonicalize every float result
//! (wasmtime's `cranelift_nan_canonicalization`), but that costs a compare and select per
//! arithmetic instruction, and a browser's engine cannot do it at all. Instead the rewrite
//! canonicalizes where NaN bits become observable, so every engine gives the same bytes:
//!
//! - scalars, just before they are observed: `f32.store`, `f64.store`,
//!   `i32.reinterpret_f32`, `i64.reinterpret_f64`, the sign operand of `f32.copysign` and
//!   `f64.copysign`, and scalars entering a vector (`f32x4.splat`, `f64x2.splat`,
//!   `f32x4.replace_lane`, `f64x2.replace_lane`);
//! - vectors, right after every lane-wise arithmetic result (`add`, `sub`, `mul`, `div`,
//!   `sqrt`, `min`, `max`, `ceil`, `floor`, `trunc`, `nearest`, `f32x4.demote_f64x2_zero`,
//!   `f64x2.promote_low_f32x4`), since any vector operation can observe lane bits.
//!
//! Canonical NaNs: `0x7fc00000` (f32), `0x7ff8000000000000` (f64).

use wasmparser::Operator;

/// What to canonicalize, and the value's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canon {
    /// A scalar `f32` on top of the stack.
    F32,
    /// A scalar `f64` on top of the stack.
    F64,
    /// An `f32x4` vector on top of the stack.
    F32x4,
    /// An `f64x2` vector on top of the stack.
    F64x2,
}

/// Canonical f32 NaN bits.
pub const F32_NAN: u32 = 0x7fc0_0000;
/// Canonical f64 NaN bits.
pub const F64_NAN: u64 = 0x7ff8_0000_0000_0000;

/// The value on top of the stack that must be canonicalized before `op` runs.
pub fn before(op: &Operator<'_>) -> Option<Canon> {
    match op {
        Operator::F32Store { .. }
        | Operator::I32ReinterpretF32
        | Operator::F32Copysign
        | Operator::F32x4Splat
        | Operator::F32x4ReplaceLane { .. } => Some(Canon::F32),
        Operator::F64Store { .. }
        | Operator::I64ReinterpretF64
        | Operator::F64Copysign
        | Operator::F64x2Splat
        | Operator::F64x2ReplaceLane { .. } => Some(Canon::F64),
        _ => None,
    }
}

/// The result of `op` that must be canonicalized after it runs.
pub fn after(op: &Operator<'_>) -> Option<Canon> {
    match op {
        Operator::F32x4Add
        | Operator::F32x4Sub
        | Operator::F32x4Mul
        | Operator::F32x4Div
        | Operator::F32x4Sqrt
        | Operator::F32x4Min
        | Operator::F32x4Max
        | Operator::F32x4Ceil
        | Operator::F32x4Floor
        | Operator::F32x4Trunc
        | Operator::F32x4Nearest
        | Operator::F32x4DemoteF64x2Zero => Some(Canon::F32x4),
        Operator::F64x2Add
        | Operator::F64x2Sub
        | Operator::F64x2Mul
        | Operator::F64x2Div
        | Operator::F64x2Sqrt
        | Operator::F64x2Min
        | Operator::F64x2Max
        | Operator::F64x2Ceil
        | Operator::F64x2Floor
        | Operator::F64x2Trunc
        | Operator::F64x2Nearest
        | Operator::F64x2PromoteLowF32x4 => Some(Canon::F64x2),
        _ => None,
    }
}
