//! A Redis prefix of a test's own (on the Redis at 127.0.0.1:6379), its
//! keys removed when dropped.

use crate::process::run;

pub struct RedisPrefix(pub String);

impl RedisPrefix {
    pub fn new(name: &str) -> RedisPrefix {
        RedisPrefix(format!("correu-test-{name}-{}", std::process::id()))
    }

    /// `[redis]` for a Correu config.
    pub fn section(&self) -> String {
        format!(
            "[redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{}\"\n",
            self.0
        )
    }

    /// Whether the key `{prefix}:{key}` exists.
    pub fn exists(&self, key: &str) -> bool {
        let (_, out, _) = run("redis-cli", &["exists", &format!("{}:{key}", self.0)]);
        out.trim() == "1"
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let (_, keys, _) = run(
            "redis-cli",
            &["--scan", "--pattern", &format!("{}:*", self.0)],
        );
        for k in keys.split_whitespace() {
            run("redis-cli", &["del", k]);
        }
    }
}
