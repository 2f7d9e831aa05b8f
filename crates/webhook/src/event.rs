//! A delivery event as the JSON a webhook receives.

use correu_proto::v1::DeliveryEvent;
pub use correu_queue::events::outcome_name;
use correu_smtp::headers::rfc3339;

/// The JSON body posted for `e` (its fields, times as RFC 3339 UTC).
pub fn to_json(e: &DeliveryEvent) -> Vec<u8> {
    let time = |micros: i64| rfc3339(micros.div_euclid(1_000_000));
    let body = serde_json::json!({
        "id": e.id,
        "event": outcome_name(e.outcome).unwrap_or("unknown"),
        "timestamp": time(e.at_unix_micros),
        "queue_id": e.queue_id,
        "sender": e.sender,
        "recipient": e.recipient,
        "domain": e.domain,
        "attempt": e.attempt,
        "received_at": time(e.received_at_unix_micros),
        "status": e.status,
        "class": e.class,
        "reply": e.reply,
        "text": e.text,
        "relay": e.relay,
        "relay_address": e.relay_address,
        "tls_version": e.tls_version,
        "tls_cipher": e.tls_cipher,
        "traceparent": e.traceparent,
    });
    body.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use correu_proto::v1::Outcome;

    #[test]
    fn names_the_outcome_and_writes_times_in_utc() {
        let e = DeliveryEvent {
            id: "abc".into(),
            outcome: Outcome::Bounced as i32,
            recipient: "nobody@remote.test".into(),
            at_unix_micros: 1_764_633_600_500_000,
            reply: "550 5.1.1 \"no\"".into(),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&to_json(&e)).unwrap();
        assert_eq!(v["event"], "bounced");
        assert_eq!(v["timestamp"], "2025-12-02T00:00:00Z");
        assert_eq!(v["reply"], "550 5.1.1 \"no\"");
        assert_eq!(v["recipient"], "nobody@remote.test");
    }
}
