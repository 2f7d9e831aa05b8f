//! Settling a message after an attempt. What to do is decided by [`plan`],
//! a pure function of the message, its recipients' outcomes, the retry
//! schedule and the message's age; [`Deliverer::settle`] only carries the
//! plan out: the report is queued first (durably), then the message is
//! republished to a retry tier with the recipients still pending, or acked.

use std::time::Duration;

use correu_proto::v1::QueuedMessage;
use correu_queue::{Delivery, Next, Schedule};
use opentelemetry::KeyValue;

use crate::Deliverer;
use crate::dsn::{self, Action};
use crate::outcome::Outcome;

/// What the settling of one attempt follows besides the schedule.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Send DSNs (`delivery.bounces`).
    pub bounces: bool,
    /// Warn the sender once when a message is this old and still pending
    /// (`delivery.delay_warning`; zero for never).
    pub delay_warning: Duration,
}

/// What became of one recipient in this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Failed for good: a permanent failure, or the maximum age reached.
    Failed,
    /// Tried again later.
    Deferred,
}

/// Where the message goes once the report (if any) is queued.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Ack,
    /// Republish to retry tier `tier`, to come back after `delay`, with
    /// only the pending recipients.
    Retry {
        tier: usize,
        delay: Duration,
        message: Box<QueuedMessage>,
    },
}

/// The whole decision for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    /// Per recipient, in the message's order.
    pub verdicts: Vec<Verdict>,
    /// Whether the message reached its maximum age in this attempt.
    pub giving_up: bool,
    /// The DSN to send: (recipient index, what to report), with each
    /// recipient's NOTIFY applied; empty for none. Never for `<>`.
    pub report: Vec<(usize, Action)>,
    pub next: Disposition,
}

/// Decides what to do with `msg` after an attempt that ended in
/// `outcomes` (one per recipient, in order), when the message is `age`
/// old.
pub fn plan(
    msg: &QueuedMessage,
    outcomes: &[Outcome],
    schedule: &Schedule,
    rules: &Rules,
    age: Duration,
) -> Settlement {
    let attempts = msg.attempt + 1;
    let pending_any = outcomes.iter().any(Outcome::is_temporary);
    let next = pending_any.then(|| schedule.next(attempts, age));
    let giving_up = next == Some(Next::GiveUp);
    // One delay warning per message, once it is old enough.
    let warn_delay = pending_any
        && !giving_up
        && !rules.delay_warning.is_zero()
        && !msg.delay_warned
        && age >= rules.delay_warning;
    let mut verdicts = Vec::with_capacity(outcomes.len());
    let mut report = Vec::new();
    let mut pending = Vec::new();
    let mut last_error = String::new();
    for (i, (r, o)) in msg.recipients.iter().zip(outcomes).enumerate() {
        let (verdict, action) = match o {
            Outcome::Delivered { remote_mta } => (
                Verdict::Delivered,
                Some(match remote_mta {
                    Some(m) => Action::Relayed {
                        remote_mta: m.clone(),
                    },
                    None => Action::Delivered,
                }),
            ),
            Outcome::Permanent(f) => (Verdict::Failed, Some(Action::Failed(f.clone()))),
            Outcome::Temporary(f) if giving_up => {
                (Verdict::Failed, Some(Action::Failed(f.clone())))
            }
            Outcome::Temporary(f) => {
                last_error = f.to_string();
                pending.push(r.clone());
                (
                    Verdict::Deferred,
                    warn_delay.then(|| Action::Delayed(f.clone())),
                )
            }
        };
        verdicts.push(verdict);
        if let Some(a) = action
            && rules.bounces
            && !msg.sender.is_empty()
            && dsn::wanted(&r.notify, &a)
        {
            report.push((i, a));
        }
    }
    let next = match next {
        Some(Next::RetryIn { tier, delay }) if !pending.is_empty() => Disposition::Retry {
            tier,
            delay,
            message: Box::new(QueuedMessage {
                recipients: pending,
                attempt: attempts,
                last_error,
                delay_warned: msg.delay_warned || warn_delay,
                ..msg.clone()
            }),
        },
        _ => Disposition::Ack,
    };
    Settlement {
        verdicts,
        giving_up,
        report,
        next,
    }
}

impl Deliverer {
    /// The schedule for `msg`'s next retry: the retry delays of the
    /// shaping rules of its pending recipients' destinations (the domain,
    /// and the host last tried, connected or not), the soonest of them
    /// when they differ;
    /// the tiers in order where no rule sets any.
    fn schedule_for(
        &self,
        msg: &QueuedMessage,
        outcomes: &[Outcome],
        hosts: &[Option<String>],
        age: Duration,
    ) -> std::borrow::Cow<'_, Schedule> {
        let attempts = msg.attempt + 1;
        let mut best: Option<(Duration, Vec<Duration>)> = None;
        for (i, (r, o)) in msg.recipients.iter().zip(outcomes).enumerate() {
            if !o.is_temporary() || self.is_local(&r.address) {
                continue;
            }
            let domain = r.address.rsplit_once('@').map_or("", |(_, d)| d);
            let host = hosts.get(i).and_then(Option::as_deref).unwrap_or("");
            // A rule's retry delays (none: the tiers in order).
            let steps: Vec<Duration> = self
                .shaping
                .rule(domain, host)
                .map(|(_, s)| s.retry_delays.iter().map(|d| d.get()).collect())
                .unwrap_or_default();
            let delay = match self.schedule.with_steps(&steps).next(attempts, age) {
                Next::RetryIn { delay, .. } => delay,
                Next::GiveUp => Duration::ZERO,
            };
            if best.as_ref().is_none_or(|(d, _)| delay < *d) {
                best = Some((delay, steps));
            }
        }
        match best {
            Some((_, steps)) if !steps.is_empty() => {
                std::borrow::Cow::Owned(self.schedule.with_steps(&steps))
            }
            _ => std::borrow::Cow::Borrowed(&self.schedule),
        }
    }

    /// The `destination` label of a remote recipient's attempt through
    /// `host`: its shaping rule, a domain of `telemetry.domains`, or
    /// `other`; never a value the operator did not name.
    fn destination_label(&self, address: &str, host: &str) -> String {
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
        if let Some((site, _)) = self.shaping.rule(domain, host) {
            return site.to_string();
        }
        self.metric_domains
            .iter()
            .find(|d| d.eq_ignore_ascii_case(domain))
            .cloned()
            .unwrap_or_else(|| "other".into())
    }

    /// Carries out [`plan`] for `msg`: logs and counts each recipient,
    /// queues the report, then retries or acks.
    pub(crate) async fn settle(
        &self,
        delivery: Delivery,
        msg: QueuedMessage,
        attempt: crate::attempt::Attempt,
    ) {
        let outcomes = attempt.outcomes;
        let id = msg.queue_id.clone();
        let attempts = msg.attempt + 1;
        let age = age_of(msg.received_at_unix_micros);
        let schedule = self.schedule_for(&msg, &outcomes, &attempt.hosts, age);
        // The message's span (delivery.message) says when not every
        // recipient was delivered.
        let deferred = outcomes.iter().filter(|o| o.is_temporary()).count();
        let failed = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Permanent(_)))
            .count();
        if deferred + failed > 0 {
            tracing::Span::current().record(
                "otel.status_description",
                format!("{deferred} deferred, {failed} failed of {}", outcomes.len()).as_str(),
            );
        }
        let s = plan(&msg, &outcomes, &schedule, &self.rules, age);
        let m = &crate::metrics::METRICS;
        let mut events = Vec::new();
        for (i, ((r, o), verdict)) in msg
            .recipients
            .iter()
            .zip(&outcomes)
            .zip(&s.verdicts)
            .enumerate()
        {
            let local = self.is_local(&r.address);
            let destination = if local { "local" } else { "remote" };
            let label = match verdict {
                Verdict::Delivered => "delivered",
                Verdict::Failed => "failed",
                Verdict::Deferred => "deferred",
            };
            m.attempts.add(
                1,
                &[
                    KeyValue::new("outcome", label),
                    KeyValue::new("destination", destination),
                ],
            );
            if !local {
                let host = attempt.hosts[i].as_deref().unwrap_or("");
                m.destination_attempts.add(
                    1,
                    &[
                        KeyValue::new("outcome", label),
                        KeyValue::new("destination", self.destination_label(&r.address, host)),
                    ],
                );
            }
            if o.is_delivered() {
                m.time_to_deliver.record(
                    age.as_secs_f64(),
                    &[KeyValue::new("destination", destination)],
                );
            }
            let line = Line::new(o, s.giving_up, attempt.via[i].as_deref(), age);
            line.log(&id, &r.address, attempts);
            if let Outcome::Permanent(f) = o
                && !local
            {
                self.suppress(&id, &r.address, f).await;
            }
            if self.events {
                events.push(self.event(&msg, r, &line, attempts));
            }
        }
        // Events go out before the message is settled: an outcome is never
        // missing from the stream (a crash before the ack repeats it).
        if !events.is_empty()
            && let Err(e) = self.queue.publish_events(&events).await
        {
            // Not worth a second delivery of the message: logged and counted.
            m.events_lost.add(events.len() as u64, &[]);
            tracing::error!(queue_id = %id, error = %e, events = events.len(), "cannot publish delivery events; they are lost");
        }
        // The report is queued (durably) before the message is settled.
        if !s.report.is_empty() {
            let dsn_id = correu_queue::new_queue_id();
            let now = age_of(0).as_micros() as i64;
            let reports: Vec<_> = s
                .report
                .iter()
                .map(|(i, a)| (&msg.recipients[*i], a.clone()))
                .collect();
            if let Some(mut report) = dsn::build(&self.hostname, &msg, &reports, &dsn_id, now) {
                // The report belongs to the message's trace.
                report.traceparent = correu_runtime::telemetry::inject()
                    .remove("traceparent")
                    .unwrap_or_default();
                match self.queue.publish(&report).await {
                    Ok(()) => {
                        // A report with a failure is a bounce.
                        let action = reports
                            .iter()
                            .map(|(_, a)| a.name())
                            .min_by_key(|a| {
                                ["failed", "delayed", "delivered", "relayed"]
                                    .iter()
                                    .position(|x| x == a)
                            })
                            .unwrap_or("failed");
                        m.reports.add(1, &[KeyValue::new("action", action)]);
                        tracing::info!(queue_id = %id, dsn = %dsn_id, to = %msg.sender, "delivery status notification queued")
                    }
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot queue the DSN; the message goes back to the queue");
                        return log_settle(&id, delivery.release().await);
                    }
                }
            }
        }
        let was_deferred = msg.attempt > 0;
        let result = match s.next {
            Disposition::Retry {
                tier,
                delay,
                message,
            } => {
                tracing::info!(queue_id = %id, attempts, retry_in = ?delay, pending = message.recipients.len(), "retry scheduled");
                m.retries.add(1, &[]);
                let r = delivery.retry(&message, tier, delay).await;
                if r.is_ok()
                    && let Some(index) = &self.index
                {
                    let entry = correu_queue::admin::Deferred::from_message(
                        &message,
                        correu_queue::index::due_in(delay),
                    );
                    if let Err(e) = index.record(&entry, delay).await {
                        tracing::debug!(queue_id = %id, error = %e, "deferred index not updated");
                    }
                }
                return log_settle(&id, r);
            }
            Disposition::Ack => delivery.ack().await,
        };
        if result.is_ok()
            && was_deferred
            && let Some(index) = &self.index
            && let Err(e) = index.remove(&id).await
        {
            tracing::debug!(queue_id = %id, error = %e, "deferred index not updated");
        }
        log_settle(&id, result);
    }
}

impl Deliverer {
    /// Puts a recipient that failed for good on the suppression list when
    /// its class is one that suppresses.
    async fn suppress(&self, id: &str, rcpt: &str, f: &crate::outcome::Failure) {
        let Some(list) = &self.suppression else {
            return;
        };
        let class = f.class();
        if f.suppressed || !list.suppresses(class) {
            return;
        }
        let reason = f.smtp_reply.as_deref().unwrap_or(&f.text);
        let entry = list.entry(rcpt, class, &f.status, reason);
        match list.add(&entry).await {
            Ok(()) => {
                crate::metrics::METRICS
                    .suppressed
                    .add(1, &[KeyValue::new("class", class)]);
                tracing::info!(queue_id = %id, recipient = %rcpt, class, "recipient suppressed");
            }
            Err(e) => {
                tracing::warn!(queue_id = %id, recipient = %rcpt, error = %e, "cannot add the recipient to the suppression list")
            }
        }
    }

    /// The event of one recipient's outcome in this attempt.
    fn event(
        &self,
        msg: &QueuedMessage,
        r: &correu_proto::v1::Recipient,
        line: &Line<'_>,
        attempt: u32,
    ) -> correu_queue::events::Event {
        use correu_proto::v1::{DeliveryEvent, Outcome as Ev};
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{}\0{attempt}\0{}", msg.queue_id, r.address));
        let id: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let domain = r
            .address
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_lowercase();
        let outcome = match line.status {
            "sent" => Ev::Delivered,
            "deferred" => Ev::Deferred,
            "expired" => Ev::Expired,
            "suppressed" => Ev::Suppressed,
            _ => Ev::Bounced,
        };
        let via = line.via;
        let e = DeliveryEvent {
            id: id.clone(),
            outcome: outcome as i32,
            queue_id: msg.queue_id.clone(),
            sender: if r.sender.is_empty() {
                msg.sender.clone()
            } else {
                r.sender.clone()
            },
            recipient: r.address.clone(),
            domain: domain.clone(),
            attempt,
            at_unix_micros: age_of(0).as_micros() as i64,
            received_at_unix_micros: msg.received_at_unix_micros,
            status: line.dsn.to_string(),
            class: line.class.to_string(),
            reply: line.reply.to_string(),
            text: line.reason.to_string(),
            relay: via.map(|v| v.relay.clone()).unwrap_or_default(),
            relay_address: via
                .and_then(|v| v.addr)
                .map(|a| a.to_string())
                .unwrap_or_default(),
            tls_version: via.map(|v| v.tls_version.clone()).unwrap_or_default(),
            tls_cipher: via.map(|v| v.tls_cipher.clone()).unwrap_or_default(),
            traceparent: msg.traceparent.clone(),
        };
        let word = correu_queue::events::outcome_name(outcome as i32).unwrap_or("unknown");
        correu_queue::events::Event {
            routing_key: correu_queue::events::routing_key(
                word,
                if domain.is_empty() { "none" } else { &domain },
            ),
            id,
            payload: prost::Message::encode_to_vec(&e),
        }
    }
}

/// The delivery log line of one recipient in one attempt, as useful as
/// Postfix's: status, DSN, relay, delays by phase, the remote reply, TLS.
pub(crate) struct Line<'a> {
    /// `sent`, `deferred`, `bounced`, `expired` or `suppressed`.
    pub status: &'static str,
    pub dsn: &'a str,
    /// The bounce class; empty when sent.
    pub class: &'static str,
    pub reply: &'a str,
    pub reason: &'a str,
    pub via: Option<&'a crate::attempt::Via>,
    /// Time in the queue before this attempt's connection (total minus
    /// connect, TLS and transfer).
    pub delay: Duration,
}

impl<'a> Line<'a> {
    pub fn new(
        o: &'a Outcome,
        giving_up: bool,
        via: Option<&'a crate::attempt::Via>,
        age: Duration,
    ) -> Line<'a> {
        let (status, dsn, class, reply, reason) = match o {
            Outcome::Delivered { .. } => ("sent", "2.0.0", "", "", ""),
            Outcome::Permanent(f) => (
                if f.suppressed {
                    "suppressed"
                } else {
                    "bounced"
                },
                f.status.as_str(),
                f.class(),
                f.smtp_reply.as_deref().unwrap_or(""),
                f.text.as_str(),
            ),
            Outcome::Temporary(f) => (
                if giving_up { "expired" } else { "deferred" },
                f.status.as_str(),
                if giving_up { "expired" } else { f.class() },
                f.smtp_reply.as_deref().unwrap_or(""),
                f.text.as_str(),
            ),
        };
        Line {
            status,
            dsn,
            class,
            reply,
            reason,
            via,
            delay: age,
        }
    }

    /// One line at info (warn for a failure for good).
    fn log(&self, id: &str, rcpt: &str, attempt: u32) {
        let zero = Duration::ZERO;
        let (connect, tls, transfer) = self
            .via
            .map_or((zero, zero, zero), |v| (v.connect, v.tls, v.transfer));
        let queued = self.delay.saturating_sub(connect + tls + transfer);
        let relay = match self.via {
            Some(v) => match v.addr {
                Some(a) => format!("{}[{}]:{}", v.relay, a.ip(), a.port()),
                None => v.relay.clone(),
            },
            None => "none".into(),
        };
        let tls_version = self.via.map_or("", |v| v.tls_version.as_str());
        let tls_cipher = self.via.map_or("", |v| v.tls_cipher.as_str());
        let tls_verify = self.via.map_or("", |v| v.tls_verify);
        let conn_use = self.via.map_or(0, |v| v.conn_use);
        let delays = format!(
            "{:.3}/{:.3}/{:.3}/{:.3}",
            queued.as_secs_f64(),
            connect.as_secs_f64(),
            tls.as_secs_f64(),
            transfer.as_secs_f64()
        );
        let message = match self.status {
            "sent" => "delivered",
            "deferred" => "delivery deferred",
            "expired" => "maximum age reached; giving up",
            "suppressed" => "recipient suppressed; not attempted",
            _ => "delivery failed permanently",
        };
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    queue_id = %id,
                    recipient = %rcpt,
                    attempt,
                    status = self.status,
                    dsn = self.dsn,
                    class = self.class,
                    relay = %relay,
                    delay = self.delay.as_secs_f64(),
                    delays = %delays,
                    conn_use,
                    tls_version,
                    tls_cipher,
                    tls_verify,
                    reply = self.reply,
                    reason = self.reason,
                    "{message}"
                )
            };
        }
        match self.status {
            "sent" | "deferred" => line!(info),
            _ => line!(warn),
        }
    }
}

fn log_settle(id: &str, result: Result<(), correu_queue::QueueError>) {
    if let Err(e) = result {
        tracing::error!(queue_id = %id, error = %e, "cannot settle message; it will be delivered again");
    }
}

/// How long ago a message was received.
pub(crate) fn age_of(received_at_unix_micros: i64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as i64;
    Duration::from_micros(now.saturating_sub(received_at_unix_micros).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use correu_proto::v1::Recipient;

    const MIN: Duration = Duration::from_secs(60);

    fn schedule() -> Schedule {
        Schedule::new(vec![MIN, 5 * MIN], Duration::from_secs(5 * 86_400))
    }

    fn rules() -> Rules {
        Rules {
            bounces: true,
            delay_warning: Duration::ZERO,
        }
    }

    fn message(rcpts: &[(&str, &str)]) -> QueuedMessage {
        QueuedMessage {
            queue_id: "Q1".into(),
            sender: "jo@domini.com".into(),
            recipients: rcpts
                .iter()
                .map(|(a, notify)| Recipient {
                    address: a.to_string(),
                    notify: notify.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn ok() -> Outcome {
        Outcome::Delivered {
            remote_mta: Some("mx.remote.test".into()),
        }
    }
    fn temp() -> Outcome {
        Outcome::temp("4.4.1", "no answer")
    }
    fn perm() -> Outcome {
        Outcome::perm("5.1.1", "no such user")
    }

    fn kinds(report: &[(usize, Action)]) -> Vec<(usize, &'static str)> {
        report
            .iter()
            .map(|(i, a)| {
                (
                    *i,
                    match a {
                        Action::Failed(_) => "failed",
                        Action::Delayed(_) => "delayed",
                        Action::Delivered => "delivered",
                        Action::Relayed { .. } => "relayed",
                    },
                )
            })
            .collect()
    }

    /// (case, recipients with NOTIFY, outcomes, age, attempt already made,
    ///  verdicts, report, retry tier or none)
    #[test]
    fn plans_table() {
        use Verdict::*;
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, &'a str)>,
            Vec<Outcome>,
            Duration,
            u32,
            Vec<Verdict>,
            Vec<(usize, &'a str)>,
            Option<usize>,
        );
        let cases: Vec<Case> = vec![
            (
                "all delivered: ack, no report",
                vec![("a@x.test", ""), ("b@x.test", "")],
                vec![ok(), ok()],
                MIN,
                0,
                vec![Delivered, Delivered],
                vec![],
                None,
            ),
            (
                "partial success: only the pending one is retried",
                vec![("a@x.test", ""), ("b@x.test", "")],
                vec![ok(), temp()],
                MIN,
                0,
                vec![Delivered, Deferred],
                vec![],
                Some(0),
            ),
            (
                "a permanent failure bounces; the rest is retried",
                vec![("a@x.test", ""), ("b@x.test", "")],
                vec![perm(), temp()],
                MIN,
                0,
                vec![Failed, Deferred],
                vec![(0, "failed")],
                Some(0),
            ),
            (
                "the second retry goes to the second tier",
                vec![("a@x.test", "")],
                vec![temp()],
                10 * MIN,
                1,
                vec![Deferred],
                vec![],
                Some(1),
            ),
            (
                "past the maximum age: given up and bounced",
                vec![("a@x.test", "")],
                vec![temp()],
                Duration::from_secs(6 * 86_400),
                9,
                vec![Failed],
                vec![(0, "failed")],
                None,
            ),
            (
                "NOTIFY=NEVER: no bounce",
                vec![("a@x.test", "NEVER")],
                vec![perm()],
                MIN,
                0,
                vec![Failed],
                vec![],
                None,
            ),
            (
                "NOTIFY=SUCCESS: a report of delivery, and only for it",
                vec![("a@x.test", "SUCCESS"), ("b@x.test", "SUCCESS")],
                vec![ok(), perm()],
                MIN,
                0,
                vec![Delivered, Failed],
                vec![(0, "relayed")],
                None,
            ),
            (
                "NOTIFY=FAILURE,SUCCESS: both",
                vec![("a@x.test", "FAILURE,SUCCESS"), ("b@x.test", "failure")],
                vec![ok(), perm()],
                MIN,
                0,
                vec![Delivered, Failed],
                vec![(0, "relayed"), (1, "failed")],
                None,
            ),
        ];
        for (name, rcpts, outcomes, age, attempt, verdicts, report, tier) in cases {
            let mut msg = message(&rcpts);
            msg.attempt = attempt;
            let s = plan(&msg, &outcomes, &schedule(), &rules(), age);
            assert_eq!(s.verdicts, verdicts, "{name}");
            assert_eq!(kinds(&s.report), report, "{name}");
            match (&s.next, tier) {
                (Disposition::Ack, None) => {}
                (
                    Disposition::Retry {
                        tier: t, message, ..
                    },
                    Some(want),
                ) => {
                    assert_eq!(*t, want, "{name}");
                    let pending: Vec<_> = verdicts
                        .iter()
                        .zip(&rcpts)
                        .filter(|(v, _)| **v == Deferred)
                        .map(|(_, r)| r.0.to_string())
                        .collect();
                    let kept: Vec<_> = message
                        .recipients
                        .iter()
                        .map(|r| r.address.clone())
                        .collect();
                    assert_eq!(kept, pending, "{name}: only pending recipients are retried");
                    assert_eq!(message.attempt, attempt + 1, "{name}");
                    assert!(message.last_error.contains("no answer"), "{name}");
                }
                (other, want) => panic!("{name}: {other:?}, want tier {want:?}"),
            }
        }
    }

    #[test]
    fn no_report_to_the_null_sender_or_when_bounces_are_off() {
        let mut msg = message(&[("a@x.test", "")]);
        msg.sender.clear();
        let s = plan(&msg, &[perm()], &schedule(), &rules(), MIN);
        assert!(s.report.is_empty());
        let msg = message(&[("a@x.test", "")]);
        let off = Rules {
            bounces: false,
            ..rules()
        };
        assert!(
            plan(&msg, &[perm()], &schedule(), &off, MIN)
                .report
                .is_empty()
        );
    }

    #[test]
    fn one_delay_warning_when_old_enough() {
        let warn = Rules {
            bounces: true,
            delay_warning: 30 * MIN,
        };
        let msg = message(&[("a@x.test", "")]);
        // Too young: no warning.
        let s = plan(&msg, &[temp()], &schedule(), &warn, MIN);
        assert!(s.report.is_empty());
        // Old enough: one, and the retried message remembers it.
        let s = plan(&msg, &[temp()], &schedule(), &warn, 31 * MIN);
        assert_eq!(kinds(&s.report), vec![(0, "delayed")]);
        let Disposition::Retry {
            message: retried, ..
        } = s.next
        else {
            panic!("{:?}", s.next)
        };
        assert!(retried.delay_warned);
        // Once warned, never again; NOTIFY without DELAY, never at all.
        let s = plan(&retried, &[temp()], &schedule(), &warn, 40 * MIN);
        assert!(s.report.is_empty());
        let msg = message(&[("a@x.test", "FAILURE")]);
        assert!(
            plan(&msg, &[temp()], &schedule(), &warn, 31 * MIN)
                .report
                .is_empty()
        );
    }
}
