//! Scaling as Kubernetes does it, with processes: several ingress pods
//! sharing RabbitMQ and Redis, one killed with SIGKILL under load; pods
//! stopped with SIGTERM in the middle of their work.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

struct Pods {
    dir: PathBuf,
    cfg: PathBuf,
    _storage: Proc,
}

impl Pods {
    /// Storage and the shared configuration; `smtp` and `extra` go in.
    fn start(dir: &Path, vhost: &Vhost, prefix: &str, smtp: &str, extra: &str) -> Pods {
        let base = format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n{smtp}\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{}\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\nretry_delays = [\"1s\"]\n[redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\"\n{extra}\n",
            dir.join("mail").display(),
            vhost.url(RABBITMQ.parse().unwrap()),
        );
        let storage_cfg = dir.join("storage.toml");
        std::fs::write(&storage_cfg, &base).unwrap();
        let mut storage = Proc::correu(CORREU, "storage", dir, &["storage"], &storage_cfg);
        let addr = storage.listening("storage listening");
        let cfg = dir.join("correu.toml");
        std::fs::write(
            &cfg,
            base.replace(
                "[storage]\n",
                &format!("[storage]\nendpoint = \"http://{addr}\"\n"),
            ),
        )
        .unwrap();
        Pods {
            dir: dir.to_path_buf(),
            cfg,
            _storage: storage,
        }
    }

    fn ingress(&self, name: &str) -> (Proc, SocketAddr) {
        let mut p = Proc::correu(CORREU, name, &self.dir, &["ingress"], &self.cfg);
        let addr = p.listening("SMTP listening");
        (p, addr)
    }

    fn delivery(&self, name: &str) -> Proc {
        let mut p = Proc::correu(CORREU, name, &self.dir, &["delivery"], &self.cfg);
        p.wait_for("delivery consuming", Duration::from_secs(20));
        p
    }

    fn pere(&self) -> PathBuf {
        self.dir.join("mail/localhost/pere")
    }
}

fn greeting(src: [u8; 4], addr: SocketAddr) -> String {
    let mut s = connect_from(src, addr);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn three_ingress_pods_share_limits_and_losing_one_loses_no_mail() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("scale");
    let prefix = format!("correu-scale-{}", std::process::id());
    // 127.0.0.1 is trusted (the load); 127.0.0.2 is a client like any
    // other, allowed 10 connections an hour wherever it lands.
    let pods = Pods::start(
        dir.path(),
        &vhost,
        &prefix,
        "trusted_networks = [\"127.0.0.1/32\"]\nconnection_rate = \"10/1h\"",
        "",
    );
    let _delivery = pods.delivery("delivery");
    let (a, a_addr) = pods.ingress("ingress-a");
    let (_b, b_addr) = pods.ingress("ingress-b");
    let (_c, c_addr) = pods.ingress("ingress-c");
    let all = [a_addr, b_addr, c_addr];

    // The per-client rate holds across the three pods (shared in Redis):
    // 30 connections spread over them, 10 greeted.
    let replies: Vec<String> = (0..30)
        .map(|i| greeting([127, 0, 0, 2], all[i % 3]))
        .collect();
    let greeted = replies.iter().filter(|r| r.starts_with("220 ")).count();
    assert_eq!(greeted, 10, "{replies:#?}");
    assert!(
        replies
            .iter()
            .filter(|r| !r.starts_with("220 "))
            .all(|r| r.starts_with("421 4.7.0")),
        "{replies:#?}"
    );

    // Load over all three; one is killed with SIGKILL in the middle.
    let sender = std::thread::spawn(move || send_many(&all, 1500, 6));
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids_in(&pods.pere()).len() < 300 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    a.signal("KILL");
    let accepted = sender.join().unwrap();
    assert!(
        accepted.len() > 1000,
        "the load went on through the other pods: {} accepted",
        accepted.len()
    );
    // Every 250 is in the mailbox exactly once.
    assert_delivered_once(&pods.pere(), &accepted, Duration::from_secs(120));
}

#[test]
fn sigterm_to_ingress_finishes_data_refuses_new_sessions_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("drain-in");
    let prefix = format!("correu-drain-in-{}", std::process::id());
    let pods = Pods::start(dir.path(), &vhost, &prefix, "shutdown_grace = \"20s\"", "");
    let _delivery = pods.delivery("delivery");
    let (mut ingress, addr) = pods.ingress("ingress");

    // Two sessions in the middle of DATA.
    let mut sessions: Vec<Smtp> = (0..2)
        .map(|i| {
            let mut c = Smtp::connect(addr);
            c.read();
            c.cmd("EHLO client.example");
            c.cmd("MAIL FROM:<jo@domini.com>");
            c.cmd("RCPT TO:<pere@localhost>");
            assert_eq!(c.cmd("DATA").code, 354);
            c.send(format!("Subject: draining {i}\r\n\r\n").as_bytes());
            c
        })
        .collect();
    let stopped_at = Instant::now();
    ingress.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));

    // A new connection during the drain: told to come back later.
    let r = greeting([127, 0, 0, 1], addr);
    assert!(r.starts_with("421 4.3.2"), "{r}");

    // The sessions in DATA finish and are queued.
    let ids: Vec<String> = sessions
        .iter_mut()
        .map(|c| {
            c.send(b"the rest of the body\r\n");
            queue_id(&c.cmd("."))
        })
        .collect();
    for c in &mut sessions {
        let r = c.read();
        assert!(r.to_string().starts_with("421 4.3.2"), "{r}");
    }
    let status = ingress.wait_exit(Duration::from_secs(25));
    assert!(status.success(), "{}", ingress.output());
    assert!(
        stopped_at.elapsed() < Duration::from_secs(25),
        "exited within its grace"
    );
    assert_delivered_once(&pods.pere(), &ids, Duration::from_secs(30));
}

#[test]
fn sigterm_to_delivery_mid_batch_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("drain-out");
    let prefix = format!("correu-drain-out-{}", std::process::id());
    let remote = dir.path().join("remote");
    // A slow remote MX: deliveries are in flight when SIGTERM comes.
    let (_mx, mx_port) = counting_mx(dir.path(), &remote, Duration::from_millis(200));
    let pods = Pods::start(
        dir.path(),
        &vhost,
        &prefix,
        "",
        &format!(
            "[delivery]\nconcurrency = 8\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{mx_port}\"\n"
        ),
    );
    let (_ingress, addr) = pods.ingress("ingress");
    let total = 60;
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.example");
    for i in 0..total {
        let r = c.send_mail(
            "jo@domini.com",
            &["ana@remote.test"],
            &format!("Subject: n{i}\r\n\r\nbody\r\n"),
        );
        assert_eq!(r.code, 250);
        if i % 40 == 39 {
            c.cmd("QUIT");
            c = Smtp::connect(addr);
            c.read();
            c.cmd("EHLO client.example");
        }
    }
    c.cmd("QUIT");

    let mut first = pods.delivery("delivery-1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while wait_maildir(&remote, 10, Duration::from_millis(50)).len() < 10 {
        assert!(Instant::now() < deadline, "{}", first.output());
    }
    let stopped_at = Instant::now();
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "{}", first.output());
    assert!(
        stopped_at.elapsed() < Duration::from_secs(35),
        "delivery exits within its 30 s drain"
    );
    // Its replacement finishes the queue.
    let _second = pods.delivery("delivery-2");
    let files = wait_maildir(&remote, total, Duration::from_secs(90));
    assert_subjects_once(&files, "n", total);
}
