//! When to try a message again: a pure function of the attempt number and
//! the message's age, so it is tested without clocks.

use std::time::Duration;

/// The retry schedule: one delay per tier, the last repeating, and the age
/// after which a message is given up (bounced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub delays: Vec<Duration>,
    pub max_age: Duration,
}

/// What to do with a message that failed temporarily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again after the delay of tier `tier`.
    RetryIn { tier: usize, delay: Duration },
    /// The message is too old: give up and bounce.
    GiveUp,
}

impl Schedule {
    /// `attempts` is how many attempts were made (1 after the first failed);
    /// `age` is the time since the message was accepted.
    pub fn next(&self, attempts: u32, age: Duration) -> Next {
        if self.delays.is_empty() || age >= self.max_age {
            return Next::GiveUp;
        }
        let tier = (attempts.max(1) as usize - 1).min(self.delays.len() - 1);
        let delay = self.delays[tier];
        // The next try would come after the maximum age: that one is the last,
        // and it comes no later than the maximum age itself.
        if age + delay > self.max_age {
            let left = self.max_age - age;
            // The shortest tier that still reaches the deadline.
            let tier = self
                .delays
                .iter()
                .position(|d| *d >= left)
                .unwrap_or(self.delays.len() - 1);
            return Next::RetryIn {
                tier,
                delay: self.delays[tier],
            };
        }
        Next::RetryIn { tier, delay }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: u64) -> Duration {
        Duration::from_secs(n * 60)
    }

    #[test]
    fn minutes_then_hours_then_give_up() {
        let s = Schedule {
            delays: vec![m(1), m(5), m(60)],
            max_age: m(24 * 60),
        };
        let cases = [
            (
                1,
                m(0),
                Next::RetryIn {
                    tier: 0,
                    delay: m(1),
                },
            ),
            (
                2,
                m(1),
                Next::RetryIn {
                    tier: 1,
                    delay: m(5),
                },
            ),
            (
                3,
                m(6),
                Next::RetryIn {
                    tier: 2,
                    delay: m(60),
                },
            ),
            (
                9,
                m(600),
                Next::RetryIn {
                    tier: 2,
                    delay: m(60),
                },
            ),
            // 3 minutes left: the 5-minute tier is the shortest that reaches it.
            (
                9,
                m(24 * 60 - 3),
                Next::RetryIn {
                    tier: 1,
                    delay: m(5),
                },
            ),
            (9, m(24 * 60), Next::GiveUp),
            (9, m(30 * 24 * 60), Next::GiveUp),
            (
                0,
                m(0),
                Next::RetryIn {
                    tier: 0,
                    delay: m(1),
                },
            ),
        ];
        for (attempts, age, want) in cases {
            assert_eq!(
                s.next(attempts, age),
                want,
                "attempts {attempts}, age {age:?}"
            );
        }
        let none = Schedule {
            delays: vec![],
            max_age: m(10),
        };
        assert_eq!(none.next(1, m(0)), Next::GiveUp);
    }
}
