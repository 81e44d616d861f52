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

/// Backoff over a list of server addresses tried in turn: an address that fails is followed
/// by the next one at once, and the delay grows only when every address of the list has
/// failed in a row. Growing it at each address made an agent moving from a killed leader to
/// the new one wait for the second and third steps (up to 400 and 800 ms more) while it went
/// past the dead address and the standby not yet leading.
#[derive(Debug, Clone)]
pub struct Rounds {
    backoff: Backoff,
    servers: usize,
    failed: usize,
}

impl Rounds {
    pub fn new(backoff: Backoff, servers: usize) -> Rounds {
        Rounds {
            backoff,
            servers: servers.max(1),
            failed: 0,
        }
    }

    /// The delay before the next attempt, after one more failure, drawn with `rng`.
    pub fn failed_with(&mut self, rng: &mut impl Rng) -> Duration {
        self.failed += 1;
        if self.failed.is_multiple_of(self.servers) {
            self.backoff.next_with(rng)
        } else {
            Duration::ZERO
        }
    }

    pub fn failed(&mut self) -> Duration {
        self.failed_with(&mut rand::rng())
    }

    /// The delay after a failure that is not an address's (a stream ended, a poll failed):
    /// the same server is asked again first.
    pub fn next_delay(&mut self) -> Duration {
        self.backoff.next_delay()
    }

    /// A server answered: the next failure starts a round, with the shortest delay.
    pub fn reset(&mut self) {
        self.failed = 0;
        self.backoff.reset();
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

    #[test]
    fn the_delay_grows_once_per_round_of_the_address_list() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = Duration::from_millis(100);
        // (servers, for each failure in a row: whether a delay is drawn, and its ceiling)
        let table: &[(usize, &[Option<u64>])] = &[
            (1, &[Some(100), Some(200), Some(400), Some(800)]),
            (2, &[None, Some(100), None, Some(200), None, Some(400)]),
            (3, &[None, None, Some(100), None, None, Some(200)]),
        ];
        for (servers, steps) in table {
            let mut r = Rounds::new(Backoff::new(base, Duration::from_secs(60)), *servers);
            for (i, step) in steps.iter().enumerate() {
                let ceiling = r.backoff.ceiling();
                let d = r.failed_with(&mut rng);
                match step {
                    None => assert_eq!(d, Duration::ZERO, "{servers} servers, failure {i}"),
                    Some(ms) => {
                        assert_eq!(
                            ceiling,
                            Duration::from_millis(*ms),
                            "{servers} servers, failure {i}"
                        );
                        assert!(d <= ceiling);
                    }
                }
            }
            r.reset();
            assert_eq!(r.failed_with(&mut rng) == Duration::ZERO, *servers > 1);
        }
    }
}
