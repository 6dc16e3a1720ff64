//! Token-bucket rate limits, per client key and per network address, so a flood from one
//! does not starve the others. Bounded: at most `max_entries` buckets are kept; when full,
//! buckets that have refilled completely (idle clients) are dropped first, then the map is
//! cleared (losing only rate state, never correctness).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// A rate: `per_s` requests per second on average, bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_s: f64,
    /// Largest burst.
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets keyed by `K`.
#[derive(Debug)]
pub struct Limiter<K> {
    rate: Rate,
    max_entries: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter with `rate` per key and at most `max_entries` keys tracked.
    pub fn new(rate: Rate, max_entries: usize) -> Self {
        Self {
            rate,
            max_entries,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key` at `now`; false when the key is over its rate.
    pub fn allow_at(&self, key: &K, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let rate = self.rate;
        if !buckets.contains_key(key) && buckets.len() >= self.max_entries {
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_s < rate.burst
            });
            if buckets.len() >= self.max_entries {
                buckets.clear();
            }
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_s).min(rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// [`Self::allow_at`] now.
    pub fn allow(&self, key: &K) -> bool {
        self.allow_at(key, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_then_refills_per_key() {
        let l = Limiter::new(
            Rate {
                per_s: 10.0,
                burst: 5.0,
            },
            100,
        );
        let t0 = Instant::now();
        assert_eq!(
            (0..8).filter(|_| l.allow_at(&"a", t0)).count(),
            5,
            "a burst of 5"
        );
        assert!(l.allow_at(&"b", t0), "another key is not affected");
        assert!(
            !l.allow_at(&"a", t0 + Duration::from_millis(50)),
            "half a token"
        );
        assert!(l.allow_at(&"a", t0 + Duration::from_millis(120)));
    }

    #[test]
    fn bounded_number_of_keys() {
        let l = Limiter::new(
            Rate {
                per_s: 1.0,
                burst: 1.0,
            },
            10,
        );
        let t0 = Instant::now();
        for i in 0..1000 {
            l.allow_at(&i, t0);
        }
        assert!(l.buckets.lock().expect("lock").len() <= 10);
    }
}
