//! The fuel cost table of metering scheme v1. Changing anything here changes what every
//! module costs, so it is versioned with [`crate::MARKER_VERSION`] and described in
//! `docs/protocol.md`.
//!
//! - Every instruction costs 1, except `call` and `call_indirect`, which cost 2.
//! - Operand-dependent work is charged dynamically, before the instruction runs, from the
//!   count operand on top of the stack (`n`, an unsigned `i32`):
//!   `memory.fill`, `memory.copy`, `memory.init`: `n >> 6` (one per 64 bytes);
//!   `table.fill`, `table.copy`, `table.init`, `table.grow`: `n` (one per element);
//!   `memory.grow`: `n << 6` (64 per 64 KiB page).
//! - Each WASI call charges the host cost documented in `docs/protocol.md` on top.

use wasmparser::Operator;

/// How an operand-dependent instruction is charged from its count operand `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dynamic {
    /// `n << k`.
    PerUnitShl(u8),
    /// `n >> k`.
    PerUnitShr(u8),
}

/// Static cost of one instruction.
pub fn op(op: &Operator<'_>) -> u64 {
    match op {
        Operator::Call { .. } | Operator::CallIndirect { .. } => 2,
        _ => 1,
    }
}

/// The dynamic charge of `op`, if its work depends on its count operand.
pub fn dynamic(op: &Operator<'_>) -> Option<Dynamic> {
    match op {
        Operator::MemoryFill { .. } | Operator::MemoryCopy { .. } | Operator::MemoryInit { .. } => {
            Some(Dynamic::PerUnitShr(6))
        }
        Operator::TableFill { .. }
        | Operator::TableCopy { .. }
        | Operator::TableInit { .. }
        | Operator::TableGrow { .. } => Some(Dynamic::PerUnitShl(0)),
        Operator::MemoryGrow { .. } => Some(Dynamic::PerUnitShl(6)),
        _ => None,
    }
}

/// True for the instructions after which a new segment starts: control may arrive at the
/// next instruction from somewhere other than the previous one, or leave before it.
pub fn ends_segment(op: &Operator<'_>) -> bool {
    matches!(
        op,
        Operator::Loop { .. }
            | Operator::If { .. }
            | Operator::Else
            | Operator::End
            | Operator::Br { .. }
            | Operator::BrIf { .. }
            | Operator::BrTable { .. }
            | Operator::Return
            | Operator::Unreachable
    )
}
