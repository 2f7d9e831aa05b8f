//! When to try a message again: a pure function of the attempt number and
//! the message's age, so it is tested without clocks.

use std::time::Duration;

/// The retry schedule: one delay per tier, the last repeating, and the age
/// after which a message is given up (bounced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub delays: Vec<Duration>,
    pub max_age: Duration,
    /// The delay wanted after each attempt, the last repeating (a shaping
    /// rule's `retry_delays`), each served by the shortest tier that waits
    /// at least as long (the tiers are the queues that exist); empty: the
    /// tiers in order.
    pub steps: Vec<Duration>,
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
    pub fn new(delays: Vec<Duration>, max_age: Duration) -> Schedule {
        Schedule {
            delays,
            max_age,
            steps: Vec::new(),
        }
    }

    /// The same tiers and age, with `steps` as the delays wanted.
    pub fn with_steps(&self, steps: &[Duration]) -> Schedule {
        Schedule {
            steps: steps.to_vec(),
            ..self.clone()
        }
    }

    /// `attempts` is how many attempts were made (1 after the first failed);
    /// `age` is the time since the message was accepted.
    pub fn next(&self, attempts: u32, age: Duration) -> Next {
        if self.delays.is_empty() || age >= self.max_age {
            return Next::GiveUp;
        }
        let n = attempts.max(1) as usize - 1;
        let tier = match self.steps.len() {
            0 => n.min(self.delays.len() - 1),
            len => self.tier_for(self.steps[n.min(len - 1)]),
        };
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

    /// The shortest tier that waits at least `want`; the longest if none.
    fn tier_for(&self, want: Duration) -> usize {
        let by_delay = |(_, d): &(usize, &Duration)| **d;
        let tiers = self.delays.iter().enumerate();
        tiers
            .clone()
            .filter(|(_, d)| **d >= want)
            .min_by_key(by_delay)
            .or_else(|| tiers.max_by_key(by_delay))
            .map_or(0, |(i, _)| i)
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
        let s = Schedule::new(vec![m(1), m(5), m(60)], m(24 * 60));
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
        let none = Schedule::new(vec![], m(10));
        assert_eq!(none.next(1, m(0)), Next::GiveUp);
    }

    #[test]
    fn a_rule_s_delays_are_served_by_the_shortest_tier_that_waits_as_long() {
        let s =
            Schedule::new(vec![m(1), m(5), m(60)], m(24 * 60)).with_steps(&[m(2), m(30), m(240)]);
        let tiers: Vec<Next> = (1..=4).map(|a| s.next(a, m(10))).collect();
        assert_eq!(
            tiers,
            vec![
                Next::RetryIn {
                    tier: 1,
                    delay: m(5)
                },
                Next::RetryIn {
                    tier: 2,
                    delay: m(60)
                },
                // Longer than every tier: the longest.
                Next::RetryIn {
                    tier: 2,
                    delay: m(60)
                },
                Next::RetryIn {
                    tier: 2,
                    delay: m(60)
                },
            ]
        );
        // An exact match is its own tier; the deadline still clamps.
        let s = s.with_steps(&[m(1)]);
        assert_eq!(
            s.next(5, m(0)),
            Next::RetryIn {
                tier: 0,
                delay: m(1)
            }
        );
        assert_eq!(s.next(5, m(24 * 60)), Next::GiveUp);
    }
}
