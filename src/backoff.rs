//! One retry schedule for every loop that waits before trying again: a channel resubscribing,
//! a backfill or an org read retrying, Bulk job polling, the repair worker and the repairs it
//! puts back. The delay starts at `min`, doubles after each attempt up to `max`, and is
//! jittered (each wait is drawn from the upper half of the current delay) so that many
//! clients refused together do not come back together. A wait ends early when its
//! cancellation token fires.
//!
//! It owns the schedule only: whether an error is worth a retry at all is the caller's error
//! policy.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// An exponential backoff with jitter and a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    jitter: bool,
    attempts: u32,
}

impl Backoff {
    /// Starts at `min` and doubles up to `max` (at least `min`), with jitter.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            current: min,
            jitter: true,
            attempts: 0,
        }
    }

    /// The same schedule without jitter: every wait is the full current delay (polling a job
    /// whose progress is the only thing being waited for).
    pub fn without_jitter(mut self) -> Backoff {
        self.jitter = false;
        self
    }

    /// The first and longest delay.
    pub fn bounds(&self) -> (Duration, Duration) {
        (self.min, self.max)
    }

    /// Waits taken since the start or the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next wait, and the schedule moved on.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        if self.jitter {
            base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
        } else {
            base
        }
    }

    /// Back to the first delay (after a success, or a connection that lasted).
    pub fn reset(&mut self) {
        self.current = self.min;
        self.attempts = 0;
    }

    /// Sleeps the next delay; `false` when `cancel` fired first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// The delay before attempt `attempt` (0-based) of a retry scheduled elsewhere (a repair
    /// put back in the queue), without jitter: `min * 2^attempt`, capped at `max`.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(30));
        self.min.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b =
            Backoff::new(Duration::from_millis(100), Duration::from_millis(350)).without_jitter();
        let waits: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350, 350]);
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_eq!(b.delay_for(0), Duration::from_millis(100));
        assert_eq!(b.delay_for(2), Duration::from_millis(350));
        assert_eq!(b.delay_for(u32::MAX), Duration::from_millis(350));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(60));
        for expected in [1000u128, 2000, 4000, 8000] {
            let d = b.next_delay().as_millis();
            assert!(d >= expected / 2 && d <= expected, "{d} for {expected}");
        }
    }

    #[tokio::test]
    async fn a_cancelled_wait_ends_at_once() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let t0 = std::time::Instant::now();
        assert!(!b.wait(&cancel).await);
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
}
