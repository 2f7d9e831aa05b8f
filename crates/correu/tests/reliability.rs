//! The queue's promise under failure: every message that got a `250` is
//! delivered exactly once. Exact counts, real RabbitMQ, real processes
//! killed with SIGKILL.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

fn wait_for_count(maildir: &Path, n: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let ids = ids_in(maildir);
        if ids.len() >= n || Instant::now() > deadline {
            return ids;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

#[test]
fn delivery_killed_mid_batch_delivers_every_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("kill-delivery");
    let base = format!(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{}\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\nprefetch = 64\n",
        dir.path().join("mail").display(),
        vhost.url(RABBITMQ.parse().unwrap())
    );
    let mut storage = Proc::correu(
        CORREU,
        "storage",
        dir.path(),
        &["storage"],
        &write(&dir.path().join("s.toml"), &base),
    );
    let storage_addr = storage.listening("storage listening");
    let with_storage = base.replace(
        "[storage]\n",
        &format!("[storage]\nendpoint = \"http://{storage_addr}\"\n"),
    );
    let svc_cfg = write(&dir.path().join("svc.toml"), &with_storage);
    let mut ingress = Proc::correu(CORREU, "ingress", dir.path(), &["ingress"], &svc_cfg);
    let smtp = ingress.listening("SMTP listening");

    // The batch waits in RabbitMQ first.
    let accepted = send_many(&[smtp], 2000, 4);
    assert_eq!(accepted.len(), 2000, "every message accepted");
    let pere = dir.path().join("mail/localhost/pere");

    let mut delivery = Proc::correu(CORREU, "delivery", dir.path(), &["delivery"], &svc_cfg);
    let partial = wait_for_count(&pere, 300, Duration::from_secs(60));
    assert!(
        partial.len() >= 300 && partial.len() < 2000,
        "killed in the middle: {}",
        partial.len()
    );
    delivery.signal("KILL");
    delivery.wait_exit(Duration::from_secs(10));
    let at_kill = ids_in(&pere).len();

    let _delivery = Proc::correu(
        CORREU,
        "delivery-again",
        dir.path(),
        &["delivery"],
        &svc_cfg,
    );
    let ids = wait_for_count(&pere, 2000, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    let ids = if ids.len() == 2000 {
        ids_in(&pere)
    } else {
        ids
    };
    assert_eq!(
        ids.len(),
        2000,
        "exactly one copy of each (killed at {at_kill})"
    );
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 2000);
    assert_eq!(
        unique,
        accepted.iter().collect::<HashSet<_>>(),
        "the mailbox holds exactly the accepted messages"
    );
    assert_eq!(
        vhost.wait_queue_len("correu.delivery", 0, Duration::from_secs(10)),
        0
    );
}

#[test]
fn serve_killed_under_load_delivers_every_accepted_message_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        &dir.path().join("correu.toml"),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n",
    );
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let addr = serve.serve_smtp_addr();
    let sender = std::thread::spawn(move || send_many(&[addr], 4000, 4));
    let pere = dir.path().join("mail/localhost/pere");
    wait_for_count(&pere, 200, Duration::from_secs(60));
    serve.signal("KILL");
    serve.wait_exit(Duration::from_secs(10));
    let accepted = sender.join().unwrap();
    assert!(
        !accepted.is_empty() && accepted.len() < 4000,
        "killed under load: {} accepted",
        accepted.len()
    );

    let _again = Proc::correu(CORREU, "serve-again", dir.path(), &["serve"], &cfg);
    // A message may also have been stored while its client was cut off
    // before the 250: stored, never acknowledged, and not a duplicate.
    assert_delivered_once(&pere, &accepted, Duration::from_secs(120));
}

#[test]
fn a_temporary_failure_is_retried_through_the_tiers_and_listed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("retry");
    let remote = dir.path().join("remote");
    let (_mx, mx_port) = flaky_mx(dir.path(), &remote, 2);
    let prefix = format!("correu-retry-{}", std::process::id());
    let cfg = write(
        &dir.path().join("correu.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\nretry_delays = [\"3s\"]\n[redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\"\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{mx_port}\"\n",
            vhost.url(RABBITMQ.parse().unwrap())
        ),
    );
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let addr = serve.serve_smtp_addr();
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client");
    let id = queue_id(&c.send_mail(
        "jo@domini.com",
        &["ana@remote.test"],
        "Subject: flaky\r\n\r\nx\r\n",
    ));

    // While it waits, the operator sees it, with the MX's answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listing = loop {
        let (st, out, err) = run(
            CORREU,
            &["queue", "--config", cfg.to_str().unwrap(), "list"],
        );
        assert!(st.success(), "{out}{err}");
        if out.contains(&id) {
            break out;
        }
        assert!(Instant::now() < deadline, "never listed as deferred: {out}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(listing.contains("451 4.3.0"), "{listing}");
    let (_, status, _) = run(CORREU, &["queue", "--config", cfg.to_str().unwrap()]);
    assert!(status.contains("correu.retry.3s"), "{status}");

    let delivered = serve.wait_for("\"message\":\"delivered\"", Duration::from_secs(60));
    assert!(
        delivered.contains(&id) && delivered.contains("\"attempt\":3"),
        "third attempt: {delivered}"
    );
    let files = wait_maildir(&remote, 1, Duration::from_secs(10));
    assert_eq!(files.len(), 1, "one copy at the remote MX");
    // Settled: gone from the index.
    std::thread::sleep(Duration::from_millis(500));
    let (_, out, _) = run(
        CORREU,
        &["queue", "--config", cfg.to_str().unwrap(), "list"],
    );
    assert!(!out.contains(&id), "{out}");
}

#[test]
fn undecodable_messages_are_parked_and_shown() {
    // The spool: a broken file in active/.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        &dir.path().join("correu.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"{}\"\n",
            dir.path().join("queue").display()
        ),
    );
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    serve.serve_smtp_addr();
    std::fs::write(
        dir.path().join("queue/active/1K1AH7X1HXN6Q0Y23"),
        b"\xff\xfe not a protobuf",
    )
    .unwrap();
    serve.wait_for("undecodable queue message", Duration::from_secs(20));
    let (st, out, err) = run(CORREU, &["queue", "--config", cfg.to_str().unwrap()]);
    assert!(st.success(), "{err}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["parked", "1"]),
        "{out}"
    );
    assert!(
        std::fs::read_to_string(dir.path().join("queue/parked/1K1AH7X1HXN6Q0Y23.reason"))
            .unwrap()
            .contains("does not decode")
    );

    // RabbitMQ: raw bytes on the work exchange.
    let vhost = Vhost::create("park");
    let amqp_cfg = write(
        &dir.path().join("amqp.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail2\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\n",
            vhost.url(RABBITMQ.parse().unwrap())
        ),
    );
    let mut amqp_serve = Proc::correu(CORREU, "serve-amqp", dir.path(), &["serve"], &amqp_cfg);
    amqp_serve.serve_smtp_addr();
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
        q.publish_raw(b"\xff\xfe not a protobuf").await.unwrap();
    });
    amqp_serve.wait_for("undecodable queue message", Duration::from_secs(20));
    assert_eq!(
        vhost.wait_queue_len("correu.parked", 1, Duration::from_secs(10)),
        1
    );
    let (st, out, err) = run(CORREU, &["queue", "--config", amqp_cfg.to_str().unwrap()]);
    assert!(st.success(), "{err}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["correu.parked", "1"]),
        "{out}"
    );
}

/// Envelopes that decode but can never be delivered (no recipients, no
/// message) are parked with their reason, on both backends, never acked in
/// silence.
#[test]
fn undeliverable_envelopes_are_parked_with_a_reason() {
    use correu_proto::Message;
    use correu_proto::v1::{QueuedMessage, Recipient};
    let no_rcpt = QueuedMessage {
        queue_id: "1K1AH7X1HXN6Q0Y24".into(),
        sender: "jo@domini.com".into(),
        content: b"Subject: nobody\r\n\r\nx\r\n".to_vec(),
        ..Default::default()
    };
    let empty = QueuedMessage {
        queue_id: "1K1AH7X1HXN6Q0Y25".into(),
        sender: "jo@domini.com".into(),
        recipients: vec![Recipient {
            address: "pere@localhost".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    // The spool.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        &dir.path().join("correu.toml"),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n",
    );
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    serve.serve_smtp_addr();
    for m in [&no_rcpt, &empty] {
        std::fs::write(
            dir.path().join("queue/active").join(&m.queue_id),
            m.encode_to_vec(),
        )
        .unwrap();
    }
    serve.wait_for("the envelope has no recipients", Duration::from_secs(20));
    serve.wait_for("the message is empty", Duration::from_secs(20));
    let reason = |id: &str| {
        std::fs::read_to_string(dir.path().join(format!("queue/parked/{id}.reason")))
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while reason(&empty.queue_id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reason(&no_rcpt.queue_id).contains("no recipients"));
    assert!(reason(&empty.queue_id).contains("empty"));
    let health = serve.listening("telemetry listening");
    let (_, metrics) = http_get(health, "/metrics");
    assert!(
        metrics.contains("correu_delivery_parked_total{reason=\"no_recipients\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("correu_delivery_parked_total{reason=\"empty\"} 1"),
        "{metrics}"
    );

    // RabbitMQ.
    let vhost = Vhost::create("park-undeliverable");
    let amqp_cfg = write(
        &dir.path().join("amqp.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail2\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\n",
            vhost.url(RABBITMQ.parse().unwrap())
        ),
    );
    let mut amqp_serve = Proc::correu(CORREU, "serve-amqp", dir.path(), &["serve"], &amqp_cfg);
    amqp_serve.serve_smtp_addr();
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
        q.publish_work(&no_rcpt, std::future::pending())
            .await
            .unwrap();
        q.publish_work(&empty, std::future::pending())
            .await
            .unwrap();
    });
    amqp_serve.wait_for("the envelope has no recipients", Duration::from_secs(20));
    amqp_serve.wait_for("the message is empty", Duration::from_secs(20));
    assert_eq!(
        vhost.wait_queue_len("correu.parked", 2, Duration::from_secs(10)),
        2
    );
}

#[test]
fn rabbitmq_restarted_while_clients_send_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rabbit = PrivateRabbit::start(&dir.path().join("rabbit"));
    let cfg = write(
        &dir.path().join("correu.toml"),
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_transactions = 100000\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\npublish_timeout = \"3s\"\nconnect_timeout = \"2s\"\n",
            rabbit.url()
        ),
    );
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let addr = serve.serve_smtp_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two clients keep sending, and keep count of 250s and 451s; no reply
    // may take longer than the publish timeout and a margin (no hang).
    let clients: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut ok = Vec::new();
                let mut deferred = 0;
                let mut slowest = Duration::ZERO;
                let mut c = Smtp::connect(addr);
                c.read();
                c.cmd("EHLO load");
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    i += 1;
                    let started = Instant::now();
                    let r = c.send_mail(
                        "jo@domini.com",
                        &["pere@localhost"],
                        &format!("Subject: {t}-{i}\r\n\r\nx\r\n"),
                    );
                    slowest = slowest.max(started.elapsed());
                    match r.code {
                        250 => ok.push(queue_id(&r)),
                        451 => {
                            deferred += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        other => panic!("unexpected {other}: {r}"),
                    }
                }
                (ok, deferred, slowest)
            })
        })
        .collect();
    let pere = dir.path().join("mail/localhost/pere");
    wait_for_count(&pere, 50, Duration::from_secs(60));
    rabbit.stop_app();
    std::thread::sleep(Duration::from_secs(3));
    rabbit.start_app();
    // Accepted again after the broker is back.
    let before = ids_in(&pere).len();
    wait_for_count(&pere, before + 50, Duration::from_secs(90));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut accepted = Vec::new();
    let mut deferred = 0;
    for c in clients {
        let (ok, d, slowest) = c.join().unwrap();
        assert!(
            slowest < Duration::from_secs(10),
            "a client waited {slowest:?}: a hang, not a 451"
        );
        accepted.extend(ok);
        deferred += d;
    }
    assert!(
        deferred > 0,
        "clients were told 451 while the broker was down"
    );
    assert_delivered_once(&pere, &accepted, Duration::from_secs(60));
    drop(serve);
}

/// A full disk under `correu serve`'s spool: every client gets `451`, the
/// server says it is not ready, the journal does not grow a file per
/// failed batch, and once there is room again it is ready and takes mail.
#[test]
fn a_full_spool_disk_is_not_ready_and_makes_no_files_per_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("queue"), "4m");
    let cfg = write(
        &dir.path().join("correu.toml"),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n",
    );
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let addr = serve.serve_smtp_addr();
    let health = serve.listening("telemetry listening");
    assert_eq!(http_get(health, "/readyz").0, 200);
    disk.fill();
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.example");
    for i in 0..30 {
        assert_eq!(c.cmd("MAIL FROM:<jo@domini.com>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<pere@localhost>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(format!("Subject: full {i}\r\n\r\nno room\r\n").as_bytes());
        let r = c.cmd(".");
        assert_eq!(
            (r.code, r.enhanced.map(|e| e.to_string())),
            (451, Some("4.3.0".into())),
            "{r}"
        );
    }
    let (status, body) = http_get(health, "/readyz");
    assert_eq!(
        status, 503,
        "not ready while the spool cannot write: {body}"
    );
    assert!(body.contains("queue"), "{body}");
    let segments = std::fs::read_dir(disk.dir.join("journal")).unwrap().count();
    assert!(
        segments <= 2,
        "{segments} journal segments after 30 failed writes"
    );
    disk.free();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(health, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let id = queue_id(&c.send_mail(
        "jo@domini.com",
        &["pere@localhost"],
        "Subject: room again\r\n\r\nok\r\n",
    ));
    let files = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(files.len(), 1);
    assert!(files[0].to_string_lossy().contains(&id));
    drop(serve);
}
