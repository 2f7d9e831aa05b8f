//! The webhook: delivery events posted as signed JSON to a real HTTP
//! receiver (Python's http.server), which checks each signature itself
//! with Python's hmac. `correu serve` from its spool, and `correu webhook`
//! as a service from RabbitMQ with Redis remembering what was posted.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");
const SECRET: &str = "whsec-correu-test";

/// An HTTP receiver: answers 500 to its first `failures` requests, then
/// 200; records each request as a JSON line (status, headers, body, and
/// whether `Correu-Signature` verified against `secret` and was recent).
const RECEIVER: &str = r#"
import hmac, hashlib, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
out, failures, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
seen = [0]
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        sig = dict(p.split('=', 1) for p in self.headers.get('Correu-Signature', '').split(',') if '=' in p)
        want = hmac.new(secret, sig.get('t', '').encode() + b'.' + body, hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(want, sig.get('v1', '')) and abs(time.time() - int(sig.get('t', '0'))) < 300
        seen[0] += 1
        status = 500 if seen[0] <= failures else 200
        with open(out, 'a') as f:
            f.write(json.dumps({'status': status, 'path': self.path, 'sig_ok': ok,
                                'id': self.headers.get('Correu-Event-Id'),
                                'type': self.headers.get('Content-Type'),
                                'body': json.loads(body)}) + '\n')
        self.send_response(status)
        self.send_header('Content-Length', '0')
        self.end_headers()
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(('127.0.0.1', 0), H)
print('listening', s.server_address[1], flush=True)
s.serve_forever()
"#;

struct Receiver {
    _proc: Proc,
    port: u16,
    log: PathBuf,
}

fn receiver(dir: &Path, failures: u32) -> Receiver {
    let script = dir.join("receiver.py");
    std::fs::write(&script, RECEIVER).unwrap();
    let log = dir.join("posts.jsonl");
    let mut p = Proc::spawn(
        "receiver",
        dir,
        &python(),
        &[
            script.to_str().unwrap(),
            log.to_str().unwrap(),
            &failures.to_string(),
            SECRET,
        ],
        &[],
    );
    let line = p.wait_for("listening", Duration::from_secs(10));
    let port = line.split_whitespace().last().unwrap().parse().unwrap();
    Receiver {
        _proc: p,
        port,
        log,
    }
}

impl Receiver {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/correu", self.port)
    }

    /// The requests so far.
    fn posts(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for `n` requests; returns them.
    fn wait_posts(&self, n: usize, within: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let p = self.posts();
            if p.len() >= n || Instant::now() > deadline {
                assert!(p.len() >= n, "{n} posts wanted, got {p:#?}");
                return p;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn webhook_section(dir: &Path, r: &Receiver, extra: &str) -> String {
    let secret = dir.join("webhook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    format!(
        "[webhook]\nurls = [\"{}\"]\nsecret_file = \"{}\"\n{extra}",
        r.url(),
        secret.display()
    )
}

/// `correu serve` posts the event of a local delivery: the receiver's
/// first answer is 500, so it comes again (same id) a second later; both
/// are signed; the event's file is gone once it was taken.
#[test]
fn serve_posts_signed_events_and_retries_a_failing_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(dir.path(), 1);
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n{}",
            webhook_section(dir.path(), &r, "")
        ),
    )
    .unwrap();
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let addr = serve.serve_smtp_addr();

    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.example");
    let id = queue_id(&c.send_mail(
        "ana@example.com",
        &["jo@localhost"],
        "Subject: hook\r\n\r\nbody\r\n",
    ));
    c.cmd("QUIT");

    let posts = r.wait_posts(2, Duration::from_secs(20));
    let failed = serve.wait_for("webhook post failed", Duration::from_secs(5));
    assert!(failed.contains("answered 500"), "{failed}");
    assert_eq!(posts.len(), 2, "{posts:#?}");
    assert_eq!(posts[0]["status"], 500);
    assert_eq!(posts[1]["status"], 200);
    for p in &posts {
        assert_eq!(p["sig_ok"], true, "signature verifies: {p}");
        assert_eq!(p["path"], "/hooks/correu");
        assert_eq!(p["type"], "application/json");
        assert_eq!(p["id"], p["body"]["id"], "the header names the event");
        assert_eq!(p["body"]["event"], "delivered");
        assert_eq!(p["body"]["queue_id"], id.as_str());
        assert_eq!(p["body"]["recipient"], "jo@localhost");
        assert_eq!(p["body"]["sender"], "ana@example.com");
        assert_eq!(p["body"]["status"], "2.0.0");
        assert!(
            p["body"]["timestamp"].as_str().unwrap().ends_with('Z'),
            "{p}"
        );
    }
    assert_eq!(
        posts[0]["id"], posts[1]["id"],
        "the retry is the same event"
    );
    serve.wait_for("event posted", Duration::from_secs(5));
    let events = dir.path().join("queue/events");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&events).unwrap().count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_dir(&events).unwrap().count(),
        0,
        "a posted event's file is removed"
    );
}

fn event(id: &str, outcome: correu_proto::v1::Outcome, rcpt: &str) -> correu_queue::events::Event {
    let e = correu_proto::v1::DeliveryEvent {
        id: id.into(),
        outcome: outcome as i32,
        queue_id: format!("Q{id}"),
        sender: "jo@localhost".into(),
        recipient: rcpt.into(),
        domain: "remote.test".into(),
        attempt: 1,
        status: "5.1.1".into(),
        ..Default::default()
    };
    let name = correu_webhook::event::outcome_name(outcome as i32).unwrap();
    correu_queue::events::Event {
        id: id.into(),
        routing_key: correu_queue::events::routing_key(name, "remote.test"),
        payload: correu_proto::Message::encode_to_vec(&e),
    }
}

/// Delivery's side of RabbitMQ keeps events for the webhook before
/// `correu webhook` ever ran (the queue is declared with the first
/// publish); the service then posts each id once (a duplicate publish,
/// as after a crash, is not posted again: Redis remembers), skips the
/// outcomes it was not asked for, and empties the queue.
#[test]
fn the_webhook_service_posts_events_kept_for_it_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("webhook");
    let redis = RedisPrefix::new("webhook");
    let r = receiver(dir.path(), 0);
    let url = vhost.url(RABBITMQ.parse().unwrap());

    use correu_proto::v1::Outcome;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let qcfg = correu_runtime::config::QueueConfig {
            url: url.clone(),
            ..Default::default()
        };
        let q = correu_queue::amqp::AmqpQueue::new(&qcfg, None);
        q.keep_events();
        q.publish_events(&[
            event("e1", Outcome::Bounced, "nobody@remote.test"),
            event("e2", Outcome::Deferred, "slow@remote.test"),
        ])
        .await
        .unwrap();
        // The same outcome published again, as after a crash between
        // publishing and settling.
        q.publish_events(&[
            event("e1", Outcome::Bounced, "nobody@remote.test"),
            event("e3", Outcome::Delivered, "ana@remote.test"),
        ])
        .await
        .unwrap();
    });
    assert_eq!(
        vhost.wait_queue_len("correu.webhook", 4, Duration::from_secs(10)),
        4,
        "kept for a webhook that has not started"
    );

    let cfg = dir.path().join("webhook.toml");
    std::fs::write(
        &cfg,
        format!(
            "[queue]\nbackend = \"rabbitmq\"\nurl = \"{url}\"\n[telemetry]\nlisten = \"127.0.0.1:0\"\n{}{}",
            redis.section(),
            webhook_section(
                dir.path(),
                &r,
                "outcomes = [\"bounced\", \"delivered\"]\nconcurrency = 1\n"
            )
        ),
    )
    .unwrap();
    let mut hook = Proc::correu(CORREU, "webhook", dir.path(), &["webhook"], &cfg);
    hook.wait_for("webhook running", Duration::from_secs(20));
    assert_eq!(
        vhost.wait_queue_len("correu.webhook", 0, Duration::from_secs(20)),
        0,
        "every event taken\n{}",
        hook.output()
    );
    let posts = r.wait_posts(2, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let posts_after = r.posts();
    assert_eq!(posts_after.len(), posts.len(), "nothing more came");
    let ids: Vec<&str> = posts.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["e1", "e3"], "e1 once, e2 (deferred) not asked for");
    assert!(posts.iter().all(|p| p["sig_ok"] == true), "{posts:#?}");
    assert_eq!(posts[0]["body"]["event"], "bounced");
    assert_eq!(posts[0]["body"]["recipient"], "nobody@remote.test");
    let line = hook
        .wait_for("already posted", Duration::from_secs(1))
        .to_string();
    assert!(line.contains("e1"), "{line}");
}
