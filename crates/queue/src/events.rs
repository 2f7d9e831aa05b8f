//! The delivery event stream (`correu.v1.DeliveryEvent`, proto/): on
//! RabbitMQ the topic exchange `<prefix>.events`, routing key
//! `<outcome>.<domain>`; for `correu serve`, files in `<spool>/events`
//! (one per event, named by time and id, so a reader takes them in order).
//!
//! Either way a publish that returned `Ok` is durable: delivery publishes
//! before it settles the message, so an outcome is never lost, and one
//! that comes twice (a crash between the two) has the same id.

use std::path::{Path, PathBuf};

/// One event, encoded, with what routes it.
#[derive(Debug, Clone)]
pub struct Event {
    /// Unique per (queue id, attempt, recipient): names the file, and is
    /// the AMQP `message_id`.
    pub id: String,
    /// `<outcome>.<domain>`.
    pub routing_key: String,
    pub payload: Vec<u8>,
}

/// An event's outcome as routing keys, webhook JSON and
/// `webhook.outcomes` name it (`delivered`, `deferred`, `bounced`,
/// `expired`, `suppressed`); `None` for an event without one.
pub fn outcome_name(outcome: i32) -> Option<&'static str> {
    use correu_proto::v1::Outcome;
    match Outcome::try_from(outcome).ok()? {
        Outcome::Delivered => Some("delivered"),
        Outcome::Deferred => Some("deferred"),
        Outcome::Bounced => Some("bounced"),
        Outcome::Expired => Some("expired"),
        Outcome::Suppressed => Some("suppressed"),
        Outcome::Unspecified => None,
    }
}

/// The routing key of an event: `<outcome>.<domain>`. Both are plain
/// (outcomes are words; domains are checked host names), so a consumer
/// binds `bounced.#` or `*.example.com`.
pub fn routing_key(outcome: &str, domain: &str) -> String {
    format!("{outcome}.{}", domain.to_ascii_lowercase())
}

/// Where `correu serve` keeps events until the webhook has posted them.
pub fn spool_dir(root: &Path) -> PathBuf {
    root.join("events")
}

/// The events waiting in `dir`, oldest first.
pub fn pending(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                if e.file_type()?.is_file() {
                    files.push(e.path());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    files.sort();
    Ok(files)
}

/// A file name for an event: its time (so names sort in order) and id.
pub(crate) fn file_name(id: &str) -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let safe: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{micros:020}-{safe}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_keep_only_safe_characters() {
        let a = file_name("Q1/../x");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = file_name("Q0");
        assert!(a < b, "{a} {b}");
        assert!(a.ends_with("-Q1____x"), "{a}");
        assert_eq!(routing_key("bounced", "Example.COM"), "bounced.example.com");
        use correu_proto::v1::Outcome;
        assert_eq!(outcome_name(Outcome::Suppressed as i32), Some("suppressed"));
        assert_eq!(outcome_name(99), None);
    }
}
