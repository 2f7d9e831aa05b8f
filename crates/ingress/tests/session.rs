//! SMTP sessions driven in memory: the driver over a duplex pipe, a real
//! embedded queue and a real storage gRPC server on port 0.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use correu_ingress::Shared;
use correu_ingress::session::{End, run_session};
use correu_queue::Queue;
use correu_queue::spool::Spool;
use correu_runtime::Config;
use correu_runtime::config::{Dur, QueueBackend};
use correu_smtp::reply::{Reply, parse_reply};
use correu_smtp::session::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

struct Rig {
    shared: Arc<Shared>,
    spool: Arc<Spool>,
    _dir: tempfile::TempDir,
    _storage_stop: tokio_util::sync::DropGuard,
    /// Where an unreachable storage "listens".
    _closed: correu_testkit::ClosedPort,
}

async fn rig(tune: impl FnOnce(&mut Config)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.queue.spool = dir.path().join("spool");
    cfg.storage.root = dir.path().join("mail");
    cfg.storage.mailboxes = vec!["pere@localhost".into()];
    cfg.smtp.max_message_size = 1000;
    tune(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let storage_cfg = cfg.clone();
    let s = stop.clone();
    tokio::spawn(async move { correu_storage::run(&storage_cfg, listener, s).await });
    let closed = correu_testkit::ClosedPort::new();
    let endpoint = if cfg.storage.endpoint == "http://unreachable" {
        format!("http://127.0.0.1:{}", closed.port)
    } else {
        format!("http://{addr}")
    };
    let storage = correu_storage_client::connect(&cfg.storage, &endpoint).unwrap();
    let queue = Queue::open(&cfg.queue, QueueBackend::Embedded, &cfg.redis)
        .await
        .unwrap();
    let Queue::Spool(spool) = queue.clone() else {
        unreachable!()
    };
    let shared = Arc::new(Shared::new(&cfg, queue, storage, CancellationToken::new()).unwrap());
    Rig {
        shared,
        spool,
        _dir: dir,
        _storage_stop: stop.drop_guard(),
        _closed: closed,
    }
}

/// The client side of an in-memory session.
struct Client {
    io: DuplexStream,
    buf: Vec<u8>,
    session: tokio::task::JoinHandle<std::io::Result<End>>,
}

fn start(rig: &Rig, peer: &str) -> Client {
    let (client, server) = tokio::io::duplex(1 << 20);
    let shared = rig.shared.clone();
    let peer: SocketAddr = peer.parse().unwrap();
    let session = tokio::spawn(async move { run_session(&shared, server, peer, Role::Mx).await });
    Client {
        io: client,
        buf: Vec::new(),
        session,
    }
}

impl Client {
    async fn read(&mut self) -> Reply {
        loop {
            if let Some((r, n)) = parse_reply(&self.buf).unwrap() {
                self.buf.drain(..n);
                return r;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut chunk))
                .await
                .expect("a reply in time")
                .unwrap();
            assert!(
                n > 0,
                "session closed; had {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.read().await.to_string()
    }

    async fn end(self) -> End {
        drop(self.io);
        self.session.await.unwrap().unwrap()
    }
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let rig = rig(|_| {}).await;
    let mut c = start(&rig, "127.0.0.1:1000");
    assert_eq!(c.read().await.code, 220);
    c.send(b"EHLO client\r\nMAIL FROM:<jo@domini.com>\r\nRCPT TO:<pere@localhost>\r\nRCPT TO:<nobody@localhost>\r\nDATA\r\n")
        .await;
    let codes: Vec<u16> = [
        c.read().await.code,
        c.read().await.code,
        c.read().await.code,
        c.read().await.code,
        c.read().await.code,
    ]
    .to_vec();
    assert_eq!(codes, vec![250, 250, 250, 550, 354]);
    // The final dot and QUIT in one write (RFC 2920 allows it).
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n").await;
    assert!(
        c.read()
            .await
            .to_string()
            .starts_with("250 2.0.0 Ok: queued as ")
    );
    assert_eq!(c.read().await.code, 221);
    assert_eq!(c.end().await, End::Quit);
    // Nothing consumes in these tests: the queued message waits in `active/`.
    assert_eq!(rig.spool.counts().unwrap().active, 1);
}

#[tokio::test]
async fn smuggled_commands_stay_in_the_body() {
    let rig = rig(|c| c.smtp.max_message_size = 10_000).await;
    let mut c = start(&rig, "127.0.0.1:1000");
    c.read().await;
    c.cmd("HELO c").await;
    c.cmd("MAIL FROM:<jo@domini.com>").await;
    c.cmd("RCPT TO:<pere@localhost>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(b"Subject: one\r\n\r\nx\n.\nMAIL FROM:<evil@x.org>\r\nRCPT TO:<pere@localhost>\r\nDATA\r\nSubject: two\r\n\r\n.\r\n")
        .await;
    assert!(c.read().await.to_string().starts_with("250 2.0.0"));
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    assert_eq!(
        rig.spool.counts().unwrap().active,
        1,
        "one message, not two"
    );
}

#[tokio::test]
async fn a_message_past_the_hop_limit_is_refused_by_data_and_by_bdat() {
    let rig = rig(|c| {
        c.smtp.max_message_size = 10_000;
        c.smtp.max_hops = 3;
    })
    .await;
    let hops = |n: usize| "Received: from a by b; Sat, 28 Nov 2026 10:00:00 +0000\r\n".repeat(n);
    let mut c = start(&rig, "127.0.0.1:1000");
    c.read().await;
    c.cmd("EHLO c").await;
    let transaction = async |c: &mut Client, received: usize, bdat: bool| -> String {
        c.cmd("MAIL FROM:<jo@domini.com>").await;
        c.cmd("RCPT TO:<pere@localhost>").await;
        let message = format!("{}Subject: hops\r\n\r\nbody\r\n", hops(received));
        if bdat {
            c.send(format!("BDAT {} LAST\r\n{message}", message.len()).as_bytes())
                .await;
        } else {
            assert!(c.cmd("DATA").await.starts_with("354"));
            c.send(format!("{message}.\r\n").as_bytes()).await;
        }
        c.read().await.to_string()
    };
    for bdat in [false, true] {
        let refused = transaction(&mut c, 4, bdat).await;
        assert!(refused.starts_with("554 5.4.6"), "bdat {bdat}: {refused}");
        let taken = transaction(&mut c, 3, bdat).await;
        assert!(taken.starts_with("250 2.0.0"), "bdat {bdat}: {taken}");
    }
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    assert_eq!(
        rig.spool.counts().unwrap().active,
        2,
        "the two messages within the limit, not the two past it"
    );
}

#[tokio::test]
async fn limits_answer_and_the_session_goes_on() {
    let rig = rig(|_| {}).await;
    let mut c = start(&rig, "127.0.0.1:1000");
    c.read().await;
    assert!(c.cmd("EHLO c").await.contains("SIZE 1000"));
    let long = format!("NOOP {}", "x".repeat(2000));
    assert!(c.cmd(&long).await.starts_with("500 5.5.2"));
    assert!(c.cmd("NOOP").await.starts_with("250 2.0.0"));
    assert!(
        c.cmd("MAIL FROM:<jo@domini.com> SIZE=5000")
            .await
            .starts_with("552 5.3.4")
    );
    assert!(c.cmd("MAIL FROM:<jo@domini.com>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<pere@localhost>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(format!("Subject: big\r\n\r\n{}\r\n.\r\n", "y".repeat(3000)).as_bytes())
        .await;
    assert!(c.read().await.to_string().starts_with("552 5.3.4"));
    assert_eq!(
        rig.spool.counts().unwrap().active,
        0,
        "nothing oversized is queued"
    );
    assert!(
        c.cmd("MAIL FROM:<jo@domini.com>").await.starts_with("250"),
        "a new transaction may start"
    );
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
}

#[tokio::test]
async fn unreachable_storage_gives_451_at_rcpt() {
    let rig = rig(|c| {
        c.storage.endpoint = "http://unreachable".into();
        c.smtp.recipient_check_timeout = Dur::secs(3);
    })
    .await;
    let mut c = start(&rig, "127.0.0.1:1000");
    c.read().await;
    c.cmd("HELO c").await;
    c.cmd("MAIL FROM:<jo@domini.com>").await;
    assert!(
        c.cmd("RCPT TO:<pere@localhost>")
            .await
            .starts_with("451 4.3.0")
    );
    // Relaying needs no lookup: a trusted client still gets its recipient.
    assert!(c.cmd("RCPT TO:<ana@remote.test>").await.starts_with("250"));
}

#[tokio::test]
async fn untrusted_clients_cannot_relay() {
    let rig = rig(|_| {}).await;
    let mut c = start(&rig, "192.0.2.10:1000");
    c.read().await;
    c.cmd("HELO c").await;
    c.cmd("MAIL FROM:<jo@domini.com>").await;
    assert!(
        c.cmd("RCPT TO:<ana@remote.test>")
            .await
            .starts_with("550 5.7.1")
    );
    assert!(
        c.cmd("RCPT TO:<pere@localhost>")
            .await
            .starts_with("250 2.1.5")
    );
}

#[tokio::test]
async fn idle_clients_time_out_with_421() {
    let rig = rig(|c| c.smtp.command_timeout = Dur(Duration::from_millis(300))).await;
    let mut c = start(&rig, "127.0.0.1:1000");
    c.read().await;
    let r = c.read().await;
    assert!(r.to_string().starts_with("421 4.4.2"), "{r}");
    assert_eq!(c.end().await, End::Timeout);
}

#[tokio::test]
async fn shutdown_tells_idle_sessions_421() {
    let rig = rig(|_| {}).await;
    let mut c = start(&rig, "127.0.0.1:1000");
    c.read().await;
    c.cmd("HELO c").await;
    rig.shared.shutdown.cancel();
    let r = c.read().await;
    assert!(r.to_string().starts_with("421 4.3.2"), "{r}");
    assert_eq!(c.end().await, End::Shutdown);
}

#[tokio::test]
async fn garbage_gets_answers_then_the_door() {
    let rig = rig(|c| c.smtp.max_errors = 3).await;
    let mut c = start(&rig, "127.0.0.1:1000");
    c.read().await;
    c.send(b"\x00\x01\x02\r\n\xff\xfe\r\nGET / HTTP/1.1\r\n")
        .await;
    assert!(c.read().await.to_string().starts_with("500 5.5.2"));
    assert!(c.read().await.to_string().starts_with("500 5.5.2"));
    assert!(c.read().await.to_string().starts_with("421 4.7.0"));
    assert_eq!(c.end().await, End::Closed);
}
