//! The three services as separate processes over the real RabbitMQ, each
//! test in a vhost of its own; remote mail goes to aiosmtpd found through
//! dnsmasq, or through a configured route.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

struct Cluster {
    _storage: Proc,
    delivery: Proc,
    ingress: Proc,
    smtp: SocketAddr,
}

/// Writes the shared config and starts storage, then delivery and ingress
/// against it. `ingress_amqp` lets a test put a proxy between ingress and
/// RabbitMQ; `extra` is appended (sections of its own).
fn cluster(dir: &Path, vhost: &Vhost, ingress_amqp: SocketAddr, extra: &str) -> Cluster {
    let base = format!(
        "domains = [\"localhost\"]\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{root}\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{url}\"\npublish_timeout = \"2s\"\nconnect_timeout = \"2s\"\nretry_delays = [\"1s\"]\n{extra}\n",
        root = dir.join("mail").display(),
        url = vhost.url(RABBITMQ.parse().unwrap()),
    );
    let storage_cfg = dir.join("storage.toml");
    std::fs::write(&storage_cfg, &base).unwrap();
    let mut storage = Proc::correu(CORREU, "storage", dir, &["storage"], &storage_cfg);
    let storage_addr = storage.listening("storage listening");
    let with_endpoint = |url: String| {
        base.replace(&vhost.url(RABBITMQ.parse().unwrap()), &url)
            .replace(
                "[storage]\n",
                &format!("[storage]\nendpoint = \"http://{storage_addr}\"\n"),
            )
    };
    let delivery_cfg = dir.join("delivery.toml");
    std::fs::write(
        &delivery_cfg,
        with_endpoint(vhost.url(RABBITMQ.parse().unwrap())),
    )
    .unwrap();
    let mut delivery = Proc::correu(CORREU, "delivery", dir, &["delivery"], &delivery_cfg);
    delivery.wait_for("delivery consuming", Duration::from_secs(20));
    let ingress_cfg = dir.join("ingress.toml");
    std::fs::write(&ingress_cfg, with_endpoint(vhost.url(ingress_amqp))).unwrap();
    let mut ingress = Proc::correu(CORREU, "ingress", dir, &["ingress"], &ingress_cfg);
    let smtp = ingress.listening("SMTP listening");
    Cluster {
        _storage: storage,
        delivery,
        ingress,
        smtp,
    }
}

fn maildir(dir: &Path, user: &str) -> PathBuf {
    dir.join("mail/localhost").join(user)
}

#[test]
fn local_and_remote_recipients_through_three_processes_and_rabbitmq() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("e2e");
    let remote_box = dir.path().join("remote-mx");
    let (_mx, mx_port) = aiosmtpd(dir.path(), &remote_box);
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            "mx-host=remote.test,mx1.remote.test,10",
            "address=/mx1.remote.test/127.0.0.1",
        ],
    );
    let extra = format!(
        "[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[delivery]\nmx_port = {mx_port}\n[delivery.routes]\n\"routed.test\" = \"127.0.0.1:{mx_port}\"\n"
    );
    let c = cluster(dir.path(), &vhost, RABBITMQ.parse().unwrap(), &extra);

    // The seed session, to a local mailbox.
    let mut s = Smtp::connect(c.smtp);
    let mut codes = vec![s.read().code];
    for line in [
        "HELO",
        "MAIL FROM: jo@domini.com",
        "RCPT TO: pere@localhost",
        "DATA",
    ] {
        codes.push(s.cmd(line).code);
    }
    s.send("Subject: seed\r\n\r\nBon dia, món!\r\n..dot\r\n".as_bytes());
    let r = s.cmd(".");
    codes.push(r.code);
    let local_id = queue_id(&r);
    codes.push(s.cmd("quit").code);
    assert_eq!(codes, vec![220, 250, 250, 250, 354, 250, 221]);

    // A remote recipient (MX from dnsmasq) and a routed one, with a local
    // one in the same message: loopback clients are trusted to relay.
    let mut s = Smtp::connect(c.smtp);
    s.read();
    s.cmd("EHLO client.example");
    let r = s.send_mail(
        "jo@domini.com",
        &["ana@remote.test", "pau@routed.test", "pere@localhost"],
        // Dot-stuffed on the wire: the body's lines are "." and "..x".
        "Subject: relayed\r\n\r\nper la xarxa\r\n..\r\n...x\r\n",
    );
    let relay_id = queue_id(&r);
    s.cmd("QUIT");

    let pere = wait_maildir(&maildir(dir.path(), "pere"), 2, Duration::from_secs(30));
    assert_eq!(pere.len(), 2, "both messages for pere are stored");
    let seed = pere
        .iter()
        .find(|p| p.to_string_lossy().contains(&local_id))
        .expect("seed message by its queue id");
    let text = read(seed);
    assert!(
        text.ends_with("Subject: seed\r\n\r\nBon dia, món!\r\n.dot\r\n"),
        "{text:?}"
    );

    let remote = wait_maildir(&remote_box, 2, Duration::from_secs(30));
    assert_eq!(
        remote.len(),
        2,
        "aiosmtpd got one copy per remote recipient"
    );
    let texts: Vec<String> = remote.iter().map(|p| read(p)).collect();
    for t in &texts {
        assert!(
            t.contains(&format!("id {relay_id}")),
            "Received header names the queue id: {t}"
        );
        // Dot-stuffing went out and came back: the body is intact.
        assert!(
            t.contains("per la xarxa\n.\n..x\n") || t.contains("per la xarxa\r\n.\r\n..x\r\n"),
            "{t:?}"
        );
    }
    assert!(
        texts
            .iter()
            .any(|t| t.contains("X-RcptTo: ana@remote.test"))
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("X-RcptTo: pau@routed.test"))
    );
    assert_eq!(
        vhost.queue_len("correu.delivery"),
        0,
        "every message was acked"
    );
    drop(c.ingress);
}

/// The broker unreachable, then silent (it takes the bytes and never
/// confirms). Every 451 is the truth: what was refused is never
/// delivered, even though the silent broker gets the message in the end.
#[test]
fn rabbitmq_unreachable_or_silent_gives_451_and_nothing_refused_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("fault");
    let redis = RedisPrefix::new("fault");
    let proxy = FaultProxy::start(RABBITMQ.parse().unwrap());
    let extra = format!("confirm_timeout = \"3s\"\n{}", redis.section());
    let mut c = cluster(dir.path(), &vhost, proxy.addr, &extra);
    let pere = maildir(dir.path(), "pere");

    // Broker unreachable: the client is told to retry, and nothing is queued.
    proxy.cut();
    let mut s = Smtp::connect(c.smtp);
    s.read();
    s.cmd("HELO client");
    let r = s.send_mail(
        "jo@domini.com",
        &["pere@localhost"],
        "Subject: lost?\r\n\r\nno\r\n",
    );
    assert!(r.to_string().starts_with("451 4.3.0"), "{r}");

    proxy.restore();
    let restored = std::time::Instant::now();
    let r = loop {
        // The first tries may still fall in the reconnection backoff.
        let r = s.send_mail(
            "jo@domini.com",
            &["pere@localhost"],
            "Subject: warm-up\r\n\r\nx\r\n",
        );
        if r.code == 250 {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let warm_id = queue_id(&r);
    // The README's figure (reconnection is tried at least once a second).
    eprintln!(
        "ingress published again {:?} after RabbitMQ came back",
        restored.elapsed()
    );
    assert!(restored.elapsed() < Duration::from_secs(5));

    // Broker silent: the message went out and no confirm comes. The
    // client waits past publish_timeout (2 s), up to confirm_timeout
    // (3 s), then hears 451 and the message is withdrawn.
    proxy.stall();
    let smtp = c.smtp;
    let stalled = std::thread::spawn(move || {
        let mut s = Smtp::connect(smtp);
        s.read();
        s.cmd("HELO client");
        let started = std::time::Instant::now();
        let r = s.send_mail(
            "jo@domini.com",
            &["pere@localhost"],
            "Subject: stalled\r\n\r\nno\r\n",
        );
        (r, started.elapsed())
    });
    // Meanwhile, with a confirm overdue, a new message is not even sent:
    // 451 at once.
    std::thread::sleep(Duration::from_millis(2500));
    let started = std::time::Instant::now();
    let r = s.send_mail(
        "jo@domini.com",
        &["pere@localhost"],
        "Subject: while stalled\r\n\r\nno\r\n",
    );
    assert!(r.to_string().starts_with("451 4.3.0"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let (r, waited) = stalled.join().unwrap();
    assert!(r.to_string().starts_with("451 4.3.0"), "{r}");
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6),
        "answered at the confirm timeout: {waited:?}"
    );

    // The broker wakes up and takes the held message after all; delivery
    // finds it withdrawn and drops it.
    proxy.restore();
    c.delivery
        .wait_for("withdrawn by ingress", Duration::from_secs(30));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let id = loop {
        let r = s.send_mail(
            "jo@domini.com",
            &["pere@localhost"],
            "Subject: back\r\n\r\nyes\r\n",
        );
        if r.code == 250 {
            break queue_id(&r);
        }
        assert!(r.to_string().starts_with("451 4.3.0"), "{r}");
        assert!(
            std::time::Instant::now() < deadline,
            "ingress did not recover"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    s.cmd("QUIT");
    wait_maildir(&pere, 2, Duration::from_secs(30));
    // A moment more, for anything that should not come.
    std::thread::sleep(Duration::from_secs(1));
    let files = wait_maildir(&pere, 0, Duration::ZERO);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.contains(&warm_id)), "{names:?}");
    assert!(names.iter().any(|n| n.contains(&id)), "{names:?}");
    let mut subjects = subjects(&files);
    subjects.sort();
    assert_eq!(
        subjects,
        ["back", "warm-up"],
        "only the messages answered 250 are stored"
    );
    assert_eq!(vhost.queue_len("correu.delivery"), 0, "nothing left behind");
    drop(c.ingress);
}

/// The confirm is lost but the broker has the message and delivery takes
/// it: ingress, giving up, finds delivery has it and answers 250, and the
/// message is stored once.
#[test]
fn a_lost_confirm_for_a_message_delivery_already_has_is_a_250() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("lostack");
    let redis = RedisPrefix::new("lostack");
    let proxy = FaultProxy::start(RABBITMQ.parse().unwrap());
    let extra = format!("confirm_timeout = \"3s\"\n{}", redis.section());
    let c = cluster(dir.path(), &vhost, proxy.addr, &extra);
    let pere = maildir(dir.path(), "pere");
    let mut s = Smtp::connect(c.smtp);
    s.read();
    s.cmd("HELO client");
    loop {
        let r = s.send_mail(
            "jo@domini.com",
            &["pere@localhost"],
            "Subject: warm-up\r\n\r\nx\r\n",
        );
        if r.code == 250 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    proxy.stall_replies();
    let started = std::time::Instant::now();
    let r = s.send_mail(
        "jo@domini.com",
        &["pere@localhost"],
        "Subject: confirm lost\r\n\r\nstill here\r\n",
    );
    assert_eq!(r.code, 250, "{r}");
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
    let id = queue_id(&r);
    proxy.restore();
    wait_maildir(&pere, 2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let files = wait_maildir(&pere, 0, Duration::ZERO);
    let subjects = subjects(&files);
    assert_eq!(
        subjects.iter().filter(|s| *s == "confirm lost").count(),
        1,
        "{subjects:?}"
    );
    assert!(files.iter().any(|f| f.to_string_lossy().contains(&id)));
    s.cmd("QUIT");
    drop(c.ingress);
}

/// [`cluster`] with a second delivery process on the same configuration,
/// consuming before this returns.
fn cluster_with_two_deliveries(dir: &Path, vhost: &Vhost, extra: &str) -> (Cluster, Proc) {
    let c = cluster(dir, vhost, RABBITMQ.parse().unwrap(), extra);
    let mut second = Proc::correu(
        CORREU,
        "delivery-2",
        dir,
        &["delivery"],
        &dir.join("delivery.toml"),
    );
    second.wait_for("delivery consuming", Duration::from_secs(20));
    (c, second)
}

/// Sends messages `n0` to `n{total-1}` (the subject) from four SMTP
/// sessions at once, message `i` to `rcpt(i)`; each must get `250`.
fn send_over_four_sessions(addr: SocketAddr, total: usize, rcpt: fn(usize) -> &'static str) {
    let senders: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut s = Smtp::connect(addr);
                s.read();
                s.cmd("EHLO client.example");
                for i in (t..total).step_by(4) {
                    let r = s.send_mail(
                        "jo@domini.com",
                        &[rcpt(i)],
                        &format!("Subject: n{i}\r\n\r\nbody\r\n"),
                    );
                    assert_eq!(r.code, 250, "{r:?}");
                }
                s.cmd("QUIT");
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
}

#[test]
fn the_connection_limit_per_host_holds_across_two_delivery_processes() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("perhost");
    let remote_box = dir.path().join("remote-mx");
    // Each DATA is held 300 ms, so deliveries overlap and 16 delivery
    // slots in two processes would open many connections at once.
    let (mx, mx_port) = counting_mx(dir.path(), &remote_box, Duration::from_millis(300));
    let prefix = format!("correu-perhost-{}", std::process::id());
    let extra = format!(
        "[redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\"\n[delivery]\nconcurrency = 8\nmax_connections_per_host = 2\nconnection_idle = \"1s\"\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{mx_port}\"\n"
    );
    let (c, second) = cluster_with_two_deliveries(dir.path(), &vhost, &extra);

    let total = 24;
    send_over_four_sessions(c.smtp, total, |_| "ana@remote.test");

    let files = wait_maildir(&remote_box, total, Duration::from_secs(120));
    assert_subjects_once(&files, "n", total);
    let peak = counting_mx_peak(&mx);
    assert_eq!(
        peak, 2,
        "at most max_connections_per_host connections at once, and the limit was reached"
    );
    let second_log = second.output();
    assert!(
        second_log.contains("\"message\":\"delivered\"")
            || second_log.contains("at its connection limit"),
        "the second delivery process took part:\n{second_log}"
    );
}

/// A shaping rule groups two MX host names into one site
/// (`mx = ["*.site.test"]`): two delivery processes sharing Redis never
/// open more than its `max_connections` to the site as a whole (the two
/// hosts are one counting MX, found through dnsmasq), and no connection
/// carries more than `max_messages_per_connection`.
#[test]
fn two_delivery_processes_share_one_sites_budget() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("site");
    let remote_box = dir.path().join("remote-mx");
    let (mx, mx_port) = counting_mx(dir.path(), &remote_box, Duration::from_millis(300));
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            "mx-host=a.test,mx1.site.test,10",
            "mx-host=b.test,mx2.site.test,10",
            "address=/mx1.site.test/127.0.0.1",
            "address=/mx2.site.test/127.0.0.1",
        ],
    );
    let prefix = format!("correu-site-{}", std::process::id());
    let extra = format!(
        "[redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\"\n[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[delivery]\nconcurrency = 8\nmx_port = {mx_port}\nmax_connections_per_host = 10\nconnection_idle = \"1s\"\n[delivery.shaping.site]\nmx = [\"*.site.test\"]\nmax_connections = 2\nmax_messages_per_connection = 2\n"
    );
    let (c, _second) = cluster_with_two_deliveries(dir.path(), &vhost, &extra);

    let total = 24;
    send_over_four_sessions(c.smtp, total, |i| {
        if i % 2 == 0 {
            "ana@a.test"
        } else {
            "bo@b.test"
        }
    });

    let files = wait_maildir(&remote_box, total, Duration::from_secs(120));
    assert_subjects_once(&files, "n", total);
    assert_eq!(
        counting_mx_peak(&mx),
        2,
        "at most the site's max_connections at once over both hosts, and the limit was reached"
    );
    // Each connection opened prints one line with a higher `open`.
    let log = std::fs::read_to_string(&mx.stdout).unwrap();
    let mut opened = 0;
    let mut last = 0;
    for l in log.lines() {
        let open: usize = l.split_whitespace().nth(1).unwrap().parse().unwrap();
        if open > last {
            opened += 1;
        }
        last = open;
    }
    assert!(
        opened >= total / 2,
        "{opened} connections for {total} messages: at most 2 each"
    );
}

/// The README's "one config file shared by all three" on one host: each
/// role binds a telemetry port of its own (9725, 9726, 9727), so all three
/// start and serve.
#[test]
fn one_config_file_serves_the_three_services_on_one_host() {
    for port in [9725, 9726, 9727] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is taken: this test needs the roles' default telemetry ports free"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("one-file");
    let storage_port = free_port();
    let cfg = dir.path().join("correu.toml");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"mx.example.org\"\ndomains = [\"localhost\"]\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[queue]\nurl = \"{}\"\n[storage]\nlisten = \"127.0.0.1:{storage_port}\"\nendpoint = \"http://127.0.0.1:{storage_port}\"\nroot = \"{}\"\n",
            vhost.url(RABBITMQ.parse().unwrap()),
            dir.path().join("mail").display(),
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let mut procs = Vec::new();
    for role in ["storage", "delivery", "ingress"] {
        let p = Proc::spawn_own_ports(role, dir.path(), CORREU, &[role, "--config", c], &[]);
        procs.push(p);
    }
    let mut health = Vec::new();
    for p in &mut procs {
        health.push(p.listening("telemetry listening").port());
    }
    assert_eq!(health, vec![9727, 9726, 9725]);
    let smtp = procs[2].listening("SMTP listening");
    let mut s = Smtp::connect(smtp);
    s.read();
    s.cmd("EHLO client.example");
    let id = queue_id(&s.send_mail(
        "jo@domini.com",
        &["pere@localhost"],
        "Subject: one file\r\n\r\nx\r\n",
    ));
    let files = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        1,
        Duration::from_secs(30),
    );
    assert!(files[0].to_string_lossy().contains(&id));
}
