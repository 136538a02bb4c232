//! Exponential backoff with jitter that gives way to shutdown.
//!
//! Every retry loop in Switchboard (Docker event stream, store outages, reload retries) waits
//! through this, so a SIGTERM during an outage never has to wait out a long sleep.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Retry pacing: `initial`, doubling up to `max`, with ±20% jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    attempts: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
            attempts: 0,
        }
    }

    /// Forget past failures: the next wait is `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.attempts = 0;
    }

    /// How many waits have been taken since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next delay (jittered), advancing the sequence.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempts += 1;
        let jitter = rand::random::<f64>() * 0.4 + 0.8;
        base.mul_f64(jitter).min(self.max)
    }

    /// Sleeps for the next delay. Returns `false` if shutdown fired first.
    ///
    /// Cancel-safe: dropping the future only skips the wait.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let d: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert!((80..=120).contains(&d[0]), "{d:?}");
        assert!((160..=240).contains(&d[1]), "{d:?}");
        assert!(d[3] <= 500 && d[4] <= 500, "{d:?}");
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }

    #[tokio::test]
    async fn wait_returns_false_on_shutdown() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let t = CancellationToken::new();
        t.cancel();
        assert!(!b.wait(&t).await);
    }
}
