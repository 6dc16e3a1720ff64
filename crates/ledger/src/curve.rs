//! Minted rewards: the contribution bonus and the uptime reward.
//!
//! ```text
//! R(x) = 1 + 9 · e^(−x / D)        x = CPU-hours the network has computed to date
//!                                  D = 1,000,000 CPU-hours
//! bonus for a provider's share s of a verified task = ⌊s · (R(x) − 1)⌋   (minted)
//! ```
//!
//! Early contributors earn up to 10× their share; the multiplier falls to 1 as the network
//! grows. One CPU-hour is [`SCU_PER_CPU_HOUR`] SCU: a reference core executes about one SCU
//! (10^9 fuel) per second. `x` counts every agreeing replica of every verified task.
//!
//! Uptime: [`UPTIME_PER_HOUR`] micro-credits (0.1 credit) per hour online, counted from
//! heartbeats and paid in whole [`UPTIME_PERIOD_MS`] periods.

use crate::Amount;

/// The curve's scale `D`, in CPU-hours.
pub const D_CPU_HOURS: f64 = 1_000_000.0;

/// SCU in one CPU-hour (3,600 s at one SCU per second).
pub const SCU_PER_CPU_HOUR: u64 = 3_600;

/// Uptime reward per hour online, micro-credits (0.1 credit).
pub const UPTIME_PER_HOUR: Amount = 100_000;

/// Uptime is paid per period of this length (6 minutes: 0.01 credit).
pub const UPTIME_PERIOD_MS: u64 = 360_000;

/// The uptime reward for one period.
pub const UPTIME_PER_PERIOD: Amount = UPTIME_PER_HOUR * UPTIME_PERIOD_MS / 3_600_000;

/// CPU-hours in `micro_scu` µSCU.
pub fn cpu_hours(micro_scu: u128) -> f64 {
    micro_scu as f64 / 1e6 / SCU_PER_CPU_HOUR as f64
}

/// The multiplier R(x) after `cpu_hours` of network compute.
pub fn multiplier(cpu_hours: f64) -> f64 {
    1.0 + 9.0 * (-cpu_hours.max(0.0) / D_CPU_HOURS).exp()
}

/// The minted bonus on a provider's `share` when the network has computed `micro_scu` so
/// far: `⌊share · (R(x) − 1)⌋`.
pub fn bonus(share: Amount, micro_scu: u128) -> Amount {
    let extra = multiplier(cpu_hours(micro_scu)) - 1.0;
    (share as f64 * extra).floor() as Amount
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_starts_at_ten_and_falls_towards_one() {
        assert_eq!(multiplier(0.0), 10.0);
        let at_d = multiplier(D_CPU_HOURS);
        assert!((at_d - (1.0 + 9.0 / std::f64::consts::E)).abs() < 1e-12);
        assert!(multiplier(50.0 * D_CPU_HOURS) < 1.0 + 1e-12);
        assert!(multiplier(10.0) > multiplier(20.0));
    }

    #[test]
    fn bonus_is_nine_times_the_share_on_a_new_network() {
        assert_eq!(bonus(800_000, 0), 7_200_000);
        assert_eq!(bonus(0, 0), 0);
        // One CPU-hour in µSCU.
        assert_eq!(cpu_hours(3_600_000_000), 1.0);
        let late = bonus(800_000, 3_600_000_000 * 10_000_000);
        assert!(late < 800, "{late}");
    }

    #[test]
    fn uptime_period_pays_a_hundredth_credit() {
        assert_eq!(UPTIME_PER_PERIOD, 10_000);
        assert_eq!(UPTIME_PER_PERIOD * 10, UPTIME_PER_HOUR);
    }
}
