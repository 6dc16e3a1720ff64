//! Prices in SCU (1 SCU = 10^9 fuel), integer micro-credits throughout.
//!
//! ```text
//! price per SCU = base × demand × priority
//! demand        = clamp((backlog + 1) / (idle + 1), 1/2, 4)     (per mille, rounded down)
//! priority      = ½ (low), 1 (normal), 2 (high)
//! task charge   = ⌈µSCU(fuel) × price per SCU / 10^6⌉ per paid replica
//! ```
//!
//! `backlog` is the number of tasks waiting for a replica; `idle` is the free slots of the
//! connected nodes. An idle network is half price, a swamped one four times the base.
//!
//! A job's price per SCU is fixed when it is submitted; its maximum — every task at its fuel
//! limit, times its redundancy — is held in escrow, and each verified task is charged its
//! metered fuel.

use stardust_proto::job::Priority;
use stardust_proto::scu::micro_scu;

/// Pricing settings of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pricing {
    /// Price of one SCU at demand 1 and normal priority, in micro-credits. Default
    /// 1,000,000 (one credit per SCU).
    pub base: u64,
}

impl Default for Pricing {
    fn default() -> Self {
        Self { base: 1_000_000 }
    }
}

/// What the market looks like now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Market {
    /// Tasks waiting for a replica.
    pub backlog: u64,
    /// Free slots on connected nodes.
    pub idle: u64,
}

/// Lowest demand factor, per mille.
pub const MIN_DEMAND_MILLI: u64 = 500;
/// Highest demand factor, per mille.
pub const MAX_DEMAND_MILLI: u64 = 4_000;

/// The demand factor, per mille: `clamp(1000 × (backlog + 1) / (idle + 1), 500, 4000)`.
pub fn demand_milli(market: Market) -> u64 {
    let f = market.backlog.saturating_add(1).saturating_mul(1000) / market.idle.saturating_add(1);
    f.clamp(MIN_DEMAND_MILLI, MAX_DEMAND_MILLI)
}

/// The priority factor, per mille.
pub fn priority_milli(priority: Priority) -> u64 {
    match priority {
        Priority::Low => 500,
        Priority::Normal => 1_000,
        Priority::High => 2_000,
    }
}

/// The price of one SCU, in micro-credits, for a job of `priority` submitted now.
pub fn price_per_scu(pricing: Pricing, market: Market, priority: Priority) -> u64 {
    let p = u128::from(pricing.base)
        * u128::from(demand_milli(market))
        * u128::from(priority_milli(priority))
        / 1_000_000;
    u64::try_from(p).unwrap_or(u64::MAX)
}

/// The charge for one replica that used `fuel`, at `price` micro-credits per SCU (rounded
/// up to the micro-credit).
pub fn replica_charge(fuel: u64, price: u64) -> u64 {
    let c = (u128::from(micro_scu(fuel)) * u128::from(price)).div_ceil(1_000_000);
    u64::try_from(c).unwrap_or(u64::MAX)
}

/// The most a job can cost: every task at its fuel limit, `redundancy` paid replicas each.
pub fn job_maximum(tasks: u64, redundancy: u8, fuel_limit: u64, price: u64) -> u64 {
    replica_charge(fuel_limit, price)
        .saturating_mul(u64::from(redundancy))
        .saturating_mul(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_follows_backlog_over_idle_capacity_within_bounds() {
        let m = |backlog, idle| demand_milli(Market { backlog, idle });
        assert_eq!(m(0, 0), 1_000);
        assert_eq!(m(0, 9), 500, "an idle network is half price");
        assert_eq!(m(3, 1), 2_000);
        assert_eq!(m(1_000_000, 0), 4_000, "clamped at 4×");
        assert_eq!(m(u64::MAX, 0), 4_000, "no overflow");
    }

    #[test]
    fn priority_and_base_multiply() {
        let pricing = Pricing { base: 1_000_000 };
        let calm = Market {
            backlog: 0,
            idle: 0,
        };
        assert_eq!(price_per_scu(pricing, calm, Priority::Normal), 1_000_000);
        assert_eq!(price_per_scu(pricing, calm, Priority::High), 2_000_000);
        assert_eq!(price_per_scu(pricing, calm, Priority::Low), 500_000);
        let busy = Market {
            backlog: 3,
            idle: 1,
        };
        assert_eq!(price_per_scu(pricing, busy, Priority::High), 4_000_000);
        assert_eq!(
            price_per_scu(Pricing { base: u64::MAX }, busy, Priority::High),
            u64::MAX
        );
    }

    #[test]
    fn charges_round_up_and_bound_the_job() {
        // 1 SCU at 1 credit per SCU is one credit.
        assert_eq!(replica_charge(1_000_000_000, 1_000_000), 1_000_000);
        // One fuel unit is still charged one micro-credit.
        assert_eq!(replica_charge(1, 1_000_000), 1);
        assert_eq!(replica_charge(0, 1_000_000), 0);
        assert_eq!(job_maximum(10, 2, 1_000_000_000, 1_000_000), 20_000_000);
        assert_eq!(job_maximum(u64::MAX, 9, u64::MAX, u64::MAX), u64::MAX);
        // A charge never exceeds the maximum's share.
        for fuel in [1, 999, 1_000, 123_456_789] {
            assert!(replica_charge(fuel, 700_000) <= replica_charge(1_000_000_000, 700_000));
        }
    }
}
