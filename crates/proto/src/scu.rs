//! The Standard Compute Unit (SCU): the one unit in which work is measured, priced and paid.
//!
//! Work is metered in *fuel*, counted by the instrumentation that `stardust-meter` injects
//! into every module (see `docs/protocol.md`, "Metering"). Fuel is deterministic: the same
//! module, input, arguments and seed give the same count on every node, native or browser.
//!
//! **1 SCU = 10⁹ fuel** — about one second of one reference core (a core that retires
//! ~10⁹ metered WebAssembly instructions per second). Money is never computed in floating
//! point: the ledger prices fuel in integer micro-SCU (1 µSCU = 1,000 fuel, rounded up).

/// Fuel in one SCU.
pub const FUEL_PER_SCU: u64 = 1_000_000_000;

/// Fuel in one micro-SCU, the integer unit used for pricing.
pub const FUEL_PER_MICRO_SCU: u64 = FUEL_PER_SCU / 1_000_000;

/// SCU for `fuel`, for display only (never for money).
pub fn scu(fuel: u64) -> f64 {
    // Precision loss above 2^53 fuel is irrelevant for display.
    fuel as f64 / FUEL_PER_SCU as f64
}

/// Integer micro-SCU for `fuel`, rounded up (a started micro-SCU is charged).
pub fn micro_scu(fuel: u64) -> u64 {
    fuel.div_ceil(FUEL_PER_MICRO_SCU)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(micro_scu(0), 0);
        assert_eq!(micro_scu(1), 1);
        assert_eq!(micro_scu(1_000), 1);
        assert_eq!(micro_scu(1_001), 2);
        assert_eq!(micro_scu(FUEL_PER_SCU), 1_000_000);
        assert!((scu(2_500_000_000) - 2.5).abs() < 1e-12);
    }
}
