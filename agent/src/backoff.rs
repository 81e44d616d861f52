//! Exponential backoff with full jitter and a cap (the "full jitter" of the AWS architecture
//! blog): the n-th delay is uniform in `[0, min(cap, base * 2^n)]`. Never a fixed sleep.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// `base` must be above zero and not above `cap` (checked by the config validation).
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        assert!(
            !base.is_zero() && base <= cap,
            "backoff base must be in (0, cap]"
        );
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, drawn with `rng`.
    pub fn next_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = rng.random_range(0..=ceiling.as_nanos().min(u64::MAX as u128) as u64);
        Duration::from_nanos(nanos)
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn grows_exponentially_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ceilings: Vec<u128> = (0..12)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_with(&mut rng);
                assert!(d <= c, "delay {d:?} above ceiling {c:?}");
                c.as_millis()
            })
            .collect();
        assert_eq!(&ceilings[..4], &[100, 200, 400, 800]);
        assert_eq!(*ceilings.last().unwrap(), 60_000);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        // Jitter: many draws at the cap are spread, not one fixed value.
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let draws: std::collections::HashSet<u64> = (0..20)
            .map(|_| b.next_with(&mut rng).as_millis() as u64)
            .collect();
        assert!(draws.len() > 15);
    }
}
