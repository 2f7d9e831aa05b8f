//! Exponential backoff with jitter, the one way Correu waits before trying a
//! connection again.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next try: doubles each time up to `max`, with up
    /// to a quarter of random jitter taken off so replicas do not retry in
    /// step.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 4.0)
    }

    /// Back to the shortest delay after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let seen: Vec<u128> = (0..5).map(|_| b.next_delay(0.0).as_millis()).collect();
        assert_eq!(seen, vec![100, 200, 350, 350, 350]);
        assert_eq!(b.next_delay(1.0).as_millis(), 262);
        b.reset();
        assert_eq!(b.next_delay(0.0).as_millis(), 100);
    }
}
