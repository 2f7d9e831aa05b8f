//! `correu queue` as an operator uses it, against a running server: a
//! deleted message leaves no trace in any listing, and parked messages,
//! undecodable ones included, are listed with their reasons, deleted and
//! given back to delivery by their id. Both backends, real RabbitMQ and
//! Redis.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// `correu queue --config CFG ARGS…`, which must succeed; its stdout.
fn queue(cfg: &Path, args: &[&str]) -> String {
    let mut all = vec!["queue", "--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    let (st, out, err) = run(CORREU, &all);
    assert!(st.success(), "correu {all:?}: {out}{err}");
    out
}

/// Polls `queue list` until it shows `id`.
fn wait_listed(cfg: &Path, args: &[&str], id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = queue(cfg, args);
        if out.contains(id) {
            return out;
        }
        assert!(Instant::now() < deadline, "{id} never listed: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends one message to a remote recipient whose MX refuses connections:
/// it is deferred for ten minutes. Returns its queue id.
fn send_deferred(serve: &mut Proc) -> String {
    let addr = serve.serve_smtp_addr();
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client");
    queue_id(&c.send_mail(
        "jo@domini.com",
        &["ana@remote.test"],
        "Subject: deferred\r\n\r\nx\r\n",
    ))
}

/// Deletes a deferred message and checks that no listing, queue or index
/// still has it.
fn delete_and_check_gone(cfg: &Path, redis: &RedisPrefix, id: &str) {
    let listing = wait_listed(cfg, &["list"], id);
    assert!(listing.contains("attempts 1"), "{listing}");
    assert!(
        redis.exists(&format!("deferred:{id}")),
        "delivery indexed {id}"
    );
    let out = queue(cfg, &["delete", id]);
    assert!(out.contains(&format!("{id}: deleted")), "{out}");
    let after = queue(cfg, &["list"]);
    assert!(!after.contains(id), "deleted, yet listed: {after}");
    assert!(
        !redis.exists(&format!("deferred:{id}")),
        "the index entry is gone"
    );
    // Deleting again: nothing left to find.
    let (st, _, err) = run(
        CORREU,
        &["queue", "--config", cfg.to_str().unwrap(), "delete", id],
    );
    assert!(!st.success() && err.contains("not found"), "{err}");
}

#[test]
fn a_deleted_deferred_message_is_no_longer_listed() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port: every attempt is deferred.
    let dead = ClosedPort::new();
    let routes = format!(
        "[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{}\"\n",
        dead.port
    );

    // RabbitMQ, with the deferred index in Redis.
    let vhost = Vhost::create("queue-delete");
    let redis = RedisPrefix::new("queue-delete-amqp");
    let cfg = write(
        &dir.path().join("amqp.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail-amqp\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\nretry_delays = [\"10m\"]\n{}{routes}",
            vhost.url(RABBITMQ.parse().unwrap()),
            redis.section()
        ),
    );
    let mut serve = Proc::correu(CORREU, "serve-amqp", dir.path(), &["serve"], &cfg);
    let id = send_deferred(&mut serve);
    assert_eq!(
        vhost.wait_queue_len("correu.retry.10m", 1, Duration::from_secs(30)),
        1
    );
    delete_and_check_gone(&cfg, &redis, &id);
    // (The broker's counts lag a little behind.)
    assert_eq!(
        vhost.wait_queue_len("correu.retry.10m", 0, Duration::from_secs(10)),
        0
    );
    drop(serve);

    // The spool: listed from its files; delivery indexes it in Redis too.
    let redis = RedisPrefix::new("queue-delete-spool");
    let cfg = write(
        &dir.path().join("spool.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail-spool\"\n[queue]\nspool = \"{}\"\nretry_delays = [\"10m\"]\n{}{routes}",
            dir.path().join("queue").display(),
            redis.section()
        ),
    );
    let mut serve = Proc::correu(CORREU, "serve-spool", dir.path(), &["serve"], &cfg);
    let id = send_deferred(&mut serve);
    delete_and_check_gone(&cfg, &redis, &id);
    let left: Vec<_> = std::fs::read_dir(dir.path().join("queue/deferred"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Ids for the undecodable messages (queue-id shaped, so the spool takes
/// them as file names).
const DOOMED: &str = "1K1AH7X1HXN6Q0Y31";
const KEPT: &str = "1K1AH7X1HXN6Q0Y32";

/// How many times `serve` has parked an undecodable message.
fn parkings(serve: &Proc) -> usize {
    serve.output().matches("undecodable queue message").count()
}

fn wait_parkings(serve: &Proc, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while parkings(serve) < n {
        assert!(
            Instant::now() < deadline,
            "{n} parkings expected\n{}",
            serve.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Both undecodable messages are parked: listed with their ids and
/// reasons, one deleted, the other requeued (parked again, its id kept),
/// then deleted too.
fn manage_parked(cfg: &Path, serve: &Proc, parked_len: &dyn Fn(usize) -> usize) {
    wait_parkings(serve, 2);
    assert_eq!(parked_len(2), 2);
    let listing = wait_listed(cfg, &["list", "--parked"], KEPT);
    for id in [DOOMED, KEPT] {
        let line = listing
            .lines()
            .position(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} not listed: {listing}"));
        let reason = listing.lines().nth(line + 1).unwrap_or_default();
        assert!(
            reason.contains("reason: envelope does not decode"),
            "{listing}"
        );
        assert!(listing.lines().nth(line).unwrap().contains("bytes"));
    }
    // Looking did not take them.
    assert_eq!(parked_len(2), 2);

    let out = queue(cfg, &["delete", DOOMED]);
    assert!(out.contains(&format!("{DOOMED}: deleted")), "{out}");
    let listing = queue(cfg, &["list", "--parked"]);
    assert!(!listing.contains(DOOMED), "{listing}");
    assert!(listing.contains(KEPT), "{listing}");
    assert_eq!(parked_len(1), 1);

    // Given back to delivery, it still does not decode: parked again,
    // and still found by its id.
    let out = queue(cfg, &["requeue", KEPT]);
    assert!(out.contains("1 parked message(s)"), "{out}");
    wait_parkings(serve, 3);
    assert_eq!(parked_len(1), 1);
    let listing = wait_listed(cfg, &["list", "--parked"], KEPT);
    assert!(listing.contains("does not decode"), "{listing}");
    let out = queue(cfg, &["delete", KEPT]);
    assert!(out.contains(&format!("{KEPT}: deleted")), "{out}");
    assert_eq!(parked_len(0), 0);
    let listing = queue(cfg, &["list", "--parked"]);
    assert!(listing.contains("no parked messages"), "{listing}");
}

#[test]
fn parked_messages_are_listed_deleted_and_requeued_by_id() {
    let dir = tempfile::tempdir().unwrap();

    // RabbitMQ: a broken producer's bytes, with its message_id.
    let vhost = Vhost::create("queue-parked");
    let cfg = write(
        &dir.path().join("amqp.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail-amqp\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\n",
            vhost.url(RABBITMQ.parse().unwrap())
        ),
    );
    let mut serve = Proc::correu(CORREU, "serve-amqp", dir.path(), &["serve"], &cfg);
    serve.serve_smtp_addr();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let qcfg = correu_runtime::config::QueueConfig {
            url: vhost.url(RABBITMQ.parse().unwrap()),
            ..Default::default()
        };
        let q = correu_queue::amqp::AmqpQueue::new(&qcfg, None);
        for id in [DOOMED, KEPT] {
            q.publish_raw_with_id(b"\xff\xfe not a protobuf", id)
                .await
                .unwrap();
        }
    });
    manage_parked(&cfg, &serve, &|n| {
        vhost.wait_queue_len("correu.parked", n, Duration::from_secs(10))
    });
    assert_eq!(vhost.queue_len("correu.delivery"), 0);
    drop(serve);

    // The spool: broken files in active/.
    let cfg = write(
        &dir.path().join("spool.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail-spool\"\n[queue]\nspool = \"{}\"\n",
            dir.path().join("queue").display()
        ),
    );
    let mut serve = Proc::correu(CORREU, "serve-spool", dir.path(), &["serve"], &cfg);
    serve.serve_smtp_addr();
    for id in [DOOMED, KEPT] {
        std::fs::write(
            dir.path().join("queue/active").join(id),
            b"\xff\xfe not a protobuf",
        )
        .unwrap();
    }
    let parked = dir.path().join("queue/parked");
    manage_parked(&cfg, &serve, &|n| {
        // Files in parked/: each message and its reason.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let files = std::fs::read_dir(&parked).unwrap().count();
            if files == 2 * n || Instant::now() > deadline {
                return files / 2;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}
