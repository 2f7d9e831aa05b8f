//! Helpers for Correu's tests: child processes, a raw SMTP client, RabbitMQ
//! vhosts, a fault-injecting TCP proxy, and the real peers (aiosmtpd as a
//! remote MX, dnsmasq as DNS). Used only as a dev-dependency.
// Test helpers: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use correu_smtp::reply::{Reply, parse_reply};

/// A child process, killed when dropped; its output goes to files.
pub struct Proc {
    pub name: String,
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    pub fn spawn(
        name: &str,
        dir: &Path,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let mut cmd = Command::new(program);
        // The caller's own CORREU_ settings must not leak into a test.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CORREU_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .env("CORREU_LOG_FORMAT", "json")
            .env("CORREU_TELEMETRY_LISTEN", "127.0.0.1:0")
            .env("CORREU_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc {
            name: name.into(),
            child,
            stdout,
            stderr,
        }
    }

    /// Starts `BINARY ARGS --config FILE` in `dir` (the `correu` binary
    /// from a test's `env!("CARGO_BIN_EXE_correu")`).
    pub fn correu(binary: &str, name: &str, dir: &Path, args: &[&str], config: &Path) -> Proc {
        let mut all: Vec<&str> = args.to_vec();
        let c = config.to_str().unwrap();
        all.extend(["--config", c]);
        Proc::spawn(name, dir, binary, &all, &[])
    }

    pub fn output(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            self.name,
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits until a line of stdout or stderr contains `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        self.wait_for_line(&[needle], within)
    }

    /// Waits for a line of output holding every one of `needles`.
    pub fn wait_for_line(&mut self, needles: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            for path in [&self.stdout, &self.stderr] {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                    return line.to_string();
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before saying {needles:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not say {needles:?} within {within:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address a service logged as listening (`"message":"<what>","addr":"…"`).
    pub fn listening(&mut self, what: &str) -> SocketAddr {
        let line = self.wait_for(&format!("\"message\":\"{what}\""), Duration::from_secs(30));
        let addr = line
            .split("\"addr\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("no addr in {line}"));
        addr.parse().unwrap()
    }

    /// `correu serve`'s SMTP address from its banner.
    pub fn serve_smtp_addr(&mut self) -> SocketAddr {
        let line = self.wait_for("  SMTP ", Duration::from_secs(30));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Every SMTP listener in `correu serve`'s banner, with its description.
    pub fn serve_listeners(&mut self) -> Vec<(SocketAddr, String)> {
        self.wait_for("Stop with Ctrl-C.", Duration::from_secs(30));
        std::fs::read_to_string(&self.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("  SMTP "))
            .map(|l| {
                let mut words = l.split_whitespace().skip(1);
                let addr = words.next().unwrap().parse().unwrap();
                (addr, words.collect::<Vec<_>>().join(" "))
            })
            .collect()
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} still running after {within:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {} failed", self.name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _killed = self.child.kill();
        let _reaped = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

/// A raw SMTP client: sends exactly the bytes given, reads whole replies.
pub struct Smtp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Smtp {
    pub fn connect(addr: SocketAddr) -> Smtp {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Smtp {
            stream,
            buf: Vec::new(),
        }
    }

    /// Wraps a connection already made (and its greeting already read).
    pub fn from_stream(stream: TcpStream) -> Smtp {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Smtp {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn read(&mut self) -> Reply {
        loop {
            if let Some((r, used)) = parse_reply(&self.buf).expect("server sent a valid reply") {
                self.buf.drain(..used);
                return r;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("reply within 30 s");
            assert!(
                n > 0,
                "server closed the connection; had {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends one line (CRLF added) and reads the reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.read()
    }

    /// Whether the server closed the connection: EOF, or a reset (a close
    /// with unread input in the server's buffer is sent as RST).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    /// Reads and drops whatever comes (a TLS alert, say) until the server
    /// closes; false if it is still open after the read timeout.
    pub fn drain_until_closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }

    /// A whole transaction; returns the reply to the final dot.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert_eq!(r.code, 250, "MAIL: {r}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert_eq!(r.code, 250, "RCPT {t}: {r}");
        }
        let r = self.cmd("DATA");
        assert_eq!(r.code, 354, "DATA: {r}");
        self.send(body.as_bytes());
        self.send(b".\r\n");
        self.read()
    }
}

/// The queue id in a `250 2.0.0 Ok: queued as ID` reply.
/// A TCP connection to `to` from the loopback address `src` (Linux routes
/// all of 127/8 to lo: a test can be several clients).
pub fn connect_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
    let sock = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5));
    if src == [127, 0, 0, 1] {
        return sock.unwrap();
    }
    // std cannot bind a client socket before connecting; tokio can.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((src, 0))).unwrap();
        s.connect(to).await.unwrap().into_std().unwrap()
    });
    // Tokio's sockets are non-blocking; the tests read blocking.
    s.set_nonblocking(false).unwrap();
    s
}

/// Sends `n` messages to `pere@localhost` over `threads` client threads
/// spread over `addrs`; a thread whose server goes away moves to the next
/// one. Returns the queue ids of the messages that got a `250`.
pub fn send_many(addrs: &[SocketAddr], n: usize, threads: usize) -> Vec<String> {
    let per = n / threads;
    let addrs = addrs.to_vec();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                let mut which = t;
                let connect = |which: &mut usize| {
                    for _ in 0..addrs.len() * 3 {
                        let addr = addrs[*which % addrs.len()];
                        *which += 1;
                        let Ok(stream) = std::net::TcpStream::connect(addr) else {
                            continue;
                        };
                        let mut c = Smtp::from_stream(stream);
                        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            c.read().code == 220 && c.cmd("EHLO load").code == 250
                        }));
                        if matches!(ok, Ok(true)) {
                            return Some(c);
                        }
                    }
                    None
                };
                let Some(mut c) = connect(&mut which) else {
                    return ids;
                };
                let mut sent = 0;
                let mut failures = 0;
                while sent < per && failures < 10 {
                    // A new session every 50 messages (smtp.max_transactions).
                    if sent > 0 && sent % 50 == 0 {
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            c.cmd("QUIT")
                        }));
                        match connect(&mut which) {
                            Some(n) => c = n,
                            None => break,
                        }
                    }
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        c.send_mail(
                            "jo@domini.com",
                            &["pere@localhost"],
                            &format!("Subject: {t}-{sent}\r\n\r\nbody\r\n"),
                        )
                    }));
                    match r {
                        Ok(r) if r.code == 250 => {
                            ids.push(queue_id(&r));
                            sent += 1;
                        }
                        // Its server went away (or refused): the next one.
                        _ => {
                            failures += 1;
                            match connect(&mut which) {
                                Some(n) => c = n,
                                None => break,
                            }
                        }
                    }
                }
                ids
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// Runs swaks: whether it succeeded, and all it printed.
pub fn swaks(args: &[&str]) -> (bool, String) {
    let (st, out, err) = run("swaks", args);
    (st.success(), format!("{out}\n{err}"))
}

/// Asserts that the messages in `files` are subjects `{prefix}0` to
/// `{prefix}{total-1}`, each exactly once.
pub fn assert_subjects_once(files: &[PathBuf], prefix: &str, total: usize) {
    let mut subjects: Vec<String> = files
        .iter()
        .map(|f| {
            read(f)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect();
    subjects.sort();
    let mut want: Vec<String> = (0..total).map(|i| format!("{prefix}{i}")).collect();
    want.sort();
    assert_eq!(subjects, want, "every message exactly once");
}

pub fn queue_id(r: &Reply) -> String {
    assert_eq!(r.code, 250, "not queued: {r}");
    r.text().rsplit(' ').next().unwrap().to_string()
}

/// Files in a Maildir's `new/`, waiting up to `within` for `count` of them.
pub fn wait_maildir(dir: &Path, count: usize, within: Duration) -> Vec<PathBuf> {
    let deadline = Instant::now() + within;
    loop {
        let files: Vec<PathBuf> = std::fs::read_dir(dir.join("new"))
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if files.len() >= count || Instant::now() > deadline {
            return files;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Queue ids of the messages in a Maildir's `new/`, from the names
/// Correu gives them (`TIME.QUEUEID_HASH.HOST,S=SIZE`).
pub fn ids_in(maildir: &Path) -> Vec<String> {
    std::fs::read_dir(maildir.join("new"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.split('.')
                        .nth(1)
                        .and_then(|u| u.split('_').next())
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every accepted queue id is in the Maildir, then checks
/// that nothing is there twice.
pub fn assert_delivered_once(maildir: &Path, accepted: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    let want: std::collections::HashSet<&String> = accepted.iter().collect();
    loop {
        let ids = ids_in(maildir);
        let have: std::collections::HashSet<&String> = ids.iter().collect();
        let missing: Vec<_> = want.difference(&have).collect();
        if missing.is_empty() {
            // Settle: a late duplicate would show now.
            std::thread::sleep(Duration::from_secs(1));
            let ids = ids_in(maildir);
            let unique: std::collections::HashSet<&String> = ids.iter().collect();
            assert_eq!(ids.len(), unique.len(), "a message stored twice");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "accepted but not delivered: {} of {}, e.g. {:?}",
            missing.len(),
            want.len(),
            missing.first()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port on 127.0.0.1 where nothing listens for as long as this lives:
/// a socket bound without `listen`, so a connection is refused at once,
/// no other test's server can take the port meanwhile, and no outgoing
/// connection is given it as its own port (which would connect to itself).
/// A port from [`free_port`] promises none of that once it is returned.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        // Without SO_REUSEADDR, so no later bind can share the port.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        ClosedPort {
            _socket: socket,
            port,
        }
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// A RabbitMQ vhost of the test's own, deleted when dropped.
pub struct Vhost {
    pub name: String,
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: is RabbitMQ running on 127.0.0.1:5672?\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Vhost {
    pub fn create(tag: &str) -> Vhost {
        let name = format!("correu-test-{tag}-{}", std::process::id());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost { name }
    }

    /// The AMQP URL of this vhost through `addr` (RabbitMQ itself or a proxy).
    pub fn url(&self, addr: SocketAddr) -> String {
        format!("amqp://guest:guest@{addr}/{}", self.name)
    }

    /// Waits up to `within` for `queue` to hold `want` messages (the
    /// broker's counts lag a little behind publishes); returns the last count.
    pub fn wait_queue_len(&self, queue: &str, want: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let n = self.queue_len(queue);
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Messages waiting in a queue of this vhost.
    pub fn queue_len(&self, queue: &str) -> usize {
        let out = Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-p",
                &self.name,
                "-q",
                "--no-table-headers",
                "name",
                "messages",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == queue).then(|| it.next()?.parse().ok())?
            })
            .next()
            .unwrap_or(0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _deleted = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

pub const RABBITMQ: &str = "127.0.0.1:5672";

/// A TCP proxy in front of a real server that a test can cut (refuse and
/// drop every connection) or stall (hold every byte) and restore.
pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// Both ends of every proxied connection, to cut them at once.
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

const PASS: u8 = 0;
const DOWN: u8 = 1;
const STALL: u8 = 2;

impl FaultProxy {
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(PASS));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (m, g) = (mode.clone(), generation.clone());
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let o = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if m.load(Ordering::SeqCst) == DOWN {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let born = g.load(Ordering::SeqCst);
                {
                    let mut o = o.lock().unwrap();
                    o.push(client.try_clone().unwrap());
                    o.push(server.try_clone().unwrap());
                }
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (m, g) = (m.clone(), g.clone());
                    std::thread::spawn(move || pump(from, to, m, g, born));
                }
            }
        });
        FaultProxy {
            addr,
            mode,
            generation,
            open,
        }
    }

    /// Refuses new connections and cuts the open ones.
    pub fn cut(&self) {
        self.mode.store(DOWN, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _closed = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Holds every byte in both directions (a broker that stops answering).
    pub fn stall(&self) {
        self.mode.store(STALL, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mode: Arc<AtomicU8>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    born: u64,
) {
    from.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 16384];
    loop {
        if generation.load(Ordering::SeqCst) != born {
            let _a = from.shutdown(std::net::Shutdown::Both);
            let _b = to.shutdown(std::net::Shutdown::Both);
            return;
        }
        if mode.load(Ordering::SeqCst) == STALL {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _b = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                // Bytes read just as the proxy stalled are held too.
                while mode.load(Ordering::SeqCst) == STALL {
                    if generation.load(Ordering::SeqCst) != born {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if generation.load(Ordering::SeqCst) != born || to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// The Python with aiosmtpd that scripts/test prepares.
pub fn python() -> String {
    std::env::var("TESTKIT_PYTHON").unwrap_or_else(|_| {
        // scripts/test makes the venv at the workspace root.
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
        if venv.exists() {
            venv.to_string_lossy().into_owned()
        } else {
            "python3".into()
        }
    })
}

/// aiosmtpd as a remote MX on 127.0.0.1:PORT, writing what it receives
/// into the Maildir `dir`.
pub fn aiosmtpd(dir: &Path, maildir: &Path) -> (Proc, u16) {
    run_aiosmtpd(
        dir,
        "aiosmtpd",
        "aiosmtpd.handlers.Mailbox",
        &[maildir.to_str().unwrap()],
    )
}

/// aiosmtpd that answers the first `failures` messages with
/// `451 4.3.0` and stores the rest in the Maildir `maildir`.
pub fn flaky_mx(dir: &Path, maildir: &Path, failures: u32) -> (Proc, u16) {
    std::fs::write(
        dir.join("flaky.py"),
        "from aiosmtpd.handlers import Mailbox\n\
         class Flaky(Mailbox):\n\
         \x20   def __init__(self, path, fails):\n\
         \x20       super().__init__(path)\n\
         \x20       self.left = int(fails)\n\
         \x20   async def handle_DATA(self, server, session, envelope):\n\
         \x20       if self.left > 0:\n\
         \x20           self.left -= 1\n\
         \x20           return '451 4.3.0 Try again later'\n\
         \x20       return await super().handle_DATA(server, session, envelope)\n\
         \x20   @classmethod\n\
         \x20   def from_cli(cls, parser, *args):\n\
         \x20       return cls(args[0], args[1])\n",
    )
    .unwrap();
    run_aiosmtpd(
        dir,
        "flaky-mx",
        "flaky.Flaky",
        &[maildir.to_str().unwrap(), &failures.to_string()],
    )
}

/// aiosmtpd as a remote MX that holds each DATA for `hold` before storing
/// it in `maildir`, and prints `open N peak M` whenever a connection opens
/// or closes (M: the most connections it had at once).
pub fn counting_mx(dir: &Path, maildir: &Path, hold: Duration) -> (Proc, u16) {
    std::fs::write(
        dir.join("counting_mx.py"),
        "import asyncio, sys\n\
         from aiosmtpd.smtp import SMTP\n\
         from aiosmtpd.handlers import Mailbox\n\
         state = {'open': 0, 'peak': 0}\n\
         def show():\n\
         \x20   print('open', state['open'], 'peak', state['peak'], flush=True)\n\
         class Counting(SMTP):\n\
         \x20   def connection_made(self, transport):\n\
         \x20       state['open'] += 1\n\
         \x20       state['peak'] = max(state['peak'], state['open'])\n\
         \x20       show()\n\
         \x20       super().connection_made(transport)\n\
         \x20   def connection_lost(self, exc):\n\
         \x20       state['open'] -= 1\n\
         \x20       show()\n\
         \x20       super().connection_lost(exc)\n\
         class Slow(Mailbox):\n\
         \x20   async def handle_DATA(self, server, session, envelope):\n\
         \x20       await asyncio.sleep(float(sys.argv[3]))\n\
         \x20       return await super().handle_DATA(server, session, envelope)\n\
         async def main():\n\
         \x20   handler = Slow(sys.argv[2])\n\
         \x20   loop = asyncio.get_running_loop()\n\
         \x20   srv = await loop.create_server(lambda: Counting(handler), '127.0.0.1', int(sys.argv[1]))\n\
         \x20   await srv.serve_forever()\n\
         asyncio.run(main())\n",
    )
    .unwrap();
    let port = free_port();
    let p = Proc::spawn(
        "counting-mx",
        dir,
        &python(),
        &[
            "-u",
            "counting_mx.py",
            &port.to_string(),
            maildir.to_str().unwrap(),
            &hold.as_secs_f64().to_string(),
        ],
        &[],
    );
    wait_port(port, Duration::from_secs(20), &p);
    (p, port)
}

/// The `peak` a [`counting_mx`] last printed.
pub fn counting_mx_peak(p: &Proc) -> usize {
    std::fs::read_to_string(&p.stdout)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.rsplit_once("peak ")
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .max()
        .unwrap_or(0)
}

/// `python -m aiosmtpd` with a handler class (importable from `dir`) and
/// its arguments, on a free port.
fn run_aiosmtpd(dir: &Path, name: &str, class: &str, args: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all = vec!["-m", "aiosmtpd", "-n", "-l", &listen, "-c", class];
    all.extend_from_slice(args);
    let pythonpath = dir.to_str().unwrap().to_string();
    let p = Proc::spawn(name, dir, &python(), &all, &[("PYTHONPATH", &pythonpath)]);
    wait_port(port, Duration::from_secs(20), &p);
    (p, port)
}

/// An HTTPS server (Python's http.server) on 127.0.0.1:PORT answering
/// `GET /.well-known/mta-sts.txt` with the policy for the request's Host
/// (`(host, policy)` pairs, as `text/plain`), 404 for anything else. It
/// prints `GET HOST PATH` for each request.
pub fn mta_sts_server(dir: &Path, cert: &TestCert, policies: &[(&str, &str)]) -> (Proc, u16) {
    let port = free_port();
    let table: Vec<String> = policies
        .iter()
        .map(|(h, p)| format!("{h:?}: {p:?}"))
        .collect();
    std::fs::write(
        dir.join("mta_sts_server.py"),
        format!(
            "import http.server, ssl, sys\n\
             POLICIES = {{{}}}\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       host = (self.headers.get('Host') or '').split(':')[0]\n\
             \x20       print('GET', host, self.path, flush=True)\n\
             \x20       body = POLICIES.get(host) if self.path == '/.well-known/mta-sts.txt' else None\n\
             \x20       if body is None:\n\
             \x20           self.send_error(404)\n\
             \x20           return\n\
             \x20       data = body.encode()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Type', 'text/plain')\n\
             \x20       self.send_header('Content-Length', str(len(data)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(data)\n\
             ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
             ctx.load_cert_chain(sys.argv[2], sys.argv[3])\n\
             srv = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H)\n\
             srv.socket = ctx.wrap_socket(srv.socket, server_side=True)\n\
             srv.serve_forever()\n",
            table.join(", ")
        ),
    )
    .unwrap();
    let p = Proc::spawn(
        "mta-sts",
        dir,
        &python(),
        &[
            "-u",
            "mta_sts_server.py",
            &port.to_string(),
            cert.cert.to_str().unwrap(),
            cert.key.to_str().unwrap(),
        ],
        &[],
    );
    wait_port(port, Duration::from_secs(20), &p);
    (p, port)
}

pub fn wait_port(port: u16, within: Duration, p: &Proc) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never listened on {port}\n{}",
            p.name,
            p.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// dnsmasq answering for the given zone lines (`mx-host=…`, `address=…`);
/// returns it and its port.
pub fn dnsmasq(dir: &Path, lines: &[&str]) -> (Proc, u16) {
    let port = free_udp_port();
    let conf = dir.join("dnsmasq.conf");
    let mut text = format!(
        "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nno-daemon\nuser=root\npid-file=\nlocal=/test/\n"
    );
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&conf, text).unwrap();
    let p = Proc::spawn(
        "dnsmasq",
        dir,
        "dnsmasq",
        &[
            "--keep-in-foreground",
            &format!("--conf-file={}", conf.display()),
        ],
        &[],
    );
    // dnsmasq answers TCP too: use that to know it is up.
    wait_port(port, Duration::from_secs(10), &p);
    (p, port)
}

fn free_udp_port() -> u16 {
    loop {
        let port = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A test PKI: a CA and a server certificate it signed, for `localhost`
/// (or the names given to [`test_cert_for`]) and 127.0.0.1 (ECDSA P-256, two days), made with the openssl command.
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA to verify `cert` with.
    pub ca: PathBuf,
}

pub fn test_cert(dir: &Path, name: &str) -> TestCert {
    test_cert_for(dir, name, &["localhost"])
}

/// A test PKI whose server certificate names `hosts` (and 127.0.0.1).
pub fn test_cert_for(dir: &Path, name: &str, hosts: &[&str]) -> TestCert {
    let p = |ext: &str| dir.join(format!("{name}{ext}"));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (ca, ca_key, csr, key, cert, ext) = (
        p("-ca.crt"),
        p("-ca.key"),
        p(".csr"),
        p(".key"),
        p(".crt"),
        p(".ext"),
    );
    let sans: Vec<String> = hosts.iter().map(|h| format!("DNS:{h}")).collect();
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName={},IP:127.0.0.1\n",
            sans.join(",")
        ),
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: Vec<Vec<String>> = vec![
        [
            &["req", "-x509"][..],
            &ec[..],
            &[
                "-keyout",
                &s(&ca_key),
                "-out",
                &s(&ca),
                "-days",
                "2",
                "-subj",
                &format!("/CN=Correu test CA {name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat()
        .iter()
        .map(|a| a.to_string())
        .collect(),
        [
            &["req"][..],
            &ec[..],
            &[
                "-keyout",
                &s(&key),
                "-out",
                &s(&csr),
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat()
        .iter()
        .map(|a| a.to_string())
        .collect(),
        [
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &s(&ca),
            "-CAkey",
            &s(&ca_key),
            "-CAcreateserial",
            "-out",
            &s(&cert),
            "-days",
            "2",
            "-sha256",
            "-extfile",
            &s(&ext),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
    ];
    for args in steps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, out, err) = run("openssl", &args);
        assert!(status.success(), "openssl {args:?} failed:\n{out}\n{err}");
    }
    TestCert { cert, key, ca }
}

/// The CLI itself: Debian's /usr/sbin wrapper switches to the rabbitmq
/// user, whose Erlang cookie is not the private node's.
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A RabbitMQ node of the test's own (own node name, ports, data and
/// cookie), so a test can stop and start the broker under load without
/// touching the shared one. Shut down when dropped.
pub struct PrivateRabbit {
    pub node: String,
    pub port: u16,
    home: PathBuf,
    server: Proc,
}

impl PrivateRabbit {
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), self.home.to_string_lossy().into_owned()),
            ("RABBITMQ_NODENAME".into(), self.node.clone()),
        ]
    }

    pub fn start(dir: &Path) -> PrivateRabbit {
        let port = free_port();
        let dist = free_port();
        let node = format!("correu-test-{}-{port}@localhost", std::process::id());
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users.guest = true\ndisk_free_limit.absolute = 50MB\nlog.console = false\nlog.file.level = warning\n"),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let env: Vec<(String, String)> = vec![
            ("HOME".into(), d("")),
            ("RABBITMQ_NODENAME".into(), node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), dist.to_string()),
            ("RABBITMQ_CONFIG_FILE".into(), d("rabbitmq.conf")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), d("enabled_plugins")),
            ("RABBITMQ_MNESIA_BASE".into(), d("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), d("log")),
            ("RABBITMQ_PID_FILE".into(), d("rabbit.pid")),
        ];
        let env_ref: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let server = Proc::spawn(
            "rabbitmq",
            dir,
            "/usr/lib/rabbitmq/bin/rabbitmq-server",
            &[],
            &env_ref,
        );
        let rabbit = PrivateRabbit {
            node,
            port,
            home: dir.to_path_buf(),
            server,
        };
        // The node registers with epmd only after a while: until then the
        // CLI cannot even reach it.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !rabbit.try_ctl(&["await_startup", "--timeout", "10"]) {
            assert!(
                Instant::now() < deadline,
                "private RabbitMQ did not start\n{}",
                rabbit.server.output()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        rabbit
    }

    fn try_ctl(&self, args: &[&str]) -> bool {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        Command::new(RABBITMQCTL)
            .args(&all)
            .envs(self.env())
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Runs rabbitmqctl against this node.
    pub fn ctl(&self, args: &[&str]) {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        let out = Command::new(RABBITMQCTL)
            .args(&all)
            .envs(self.env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl {all:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.server.output()
        );
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the broker application (the node stays, clients are cut off).
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        self.ctl(&["await_startup", "--timeout", "120"]);
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _stopped = Command::new(RABBITMQCTL)
            .args(["-n", &self.node, "shutdown"])
            .envs(self.env())
            .output();
    }
}

/// A private Postfix instance (Debian's postfix, run as
/// `postfix -c DIR/etc`), listening on 127.0.0.1:`port`, stopped when
/// dropped. `main_extra` is appended to its main.cf.
pub struct Postfix {
    etc: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    /// Where `virtual_mailbox_base` should point for Maildir delivery.
    pub vmail: PathBuf,
}

impl Postfix {
    pub fn start(dir: &Path, main_extra: &str) -> Postfix {
        Self::start_on(dir, free_port(), main_extra)
    }

    /// Postfix on a chosen port (`main_extra` may use `{VMAIL}` for its
    /// Maildir base).
    pub fn start_on(dir: &Path, port: u16, main_extra: &str) -> Postfix {
        let main_extra = main_extra.replace("{VMAIL}", &dir.join("vmail").to_string_lossy());
        let etc = dir.join("etc");
        for sub in ["etc", "spool", "data", "vmail"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let chown = |owner: &str, sub: &str| {
            let (st, _, err) = run("chown", &[owner, dir.join(sub).to_str().unwrap()]);
            assert!(
                st.success(),
                "chown: {err} (is postfix installed? scripts/test installs it)"
            );
        };
        chown("postfix:postfix", "data");
        // virtual(8) writes mailboxes as nobody, who must reach the folder
        // (temporary directories are private to root).
        chown("65534:65534", "vmail");
        for d in dir.ancestors().take(2) {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let d = dir.display();
        std::fs::write(
            etc.join("main.cf"),
            format!(
                "compatibility_level = 3.6\nconfig_directory = {d}/etc\nqueue_directory = {d}/spool\ndata_directory = {d}/data\n\
                 maillog_file = {d}/maillog\nmaillog_file_prefixes = {d}\nmail_owner = postfix\nsetgid_group = postdrop\n\
                 myhostname = postfix.test\nmydestination =\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n\
                 mynetworks = 127.0.0.0/8\nbiff = no\nalias_maps =\nalias_database =\n\
                 smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n{main_extra}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            etc.join("master.cf"),
            format!(
                "127.0.0.1:{port} inet n - n - - smtpd\npickup unix n - n 60 1 pickup\ncleanup unix n - n - 0 cleanup\n\
                 qmgr unix n - n 300 1 qmgr\nrewrite unix - - n - - trivial-rewrite\nbounce unix - - n - 0 bounce\n\
                 defer unix - - n - 0 bounce\ntrace unix - - n - 0 bounce\nverify unix - - n - 1 verify\n\
                 flush unix n - n 1000? 0 flush\nproxymap unix - - n - - proxymap\nsmtp unix - - n - - smtp\n\
                 relay unix - - n - - smtp\nvirtual unix - n n - - virtual\nshowq unix n - n - - showq\nerror unix - - n - - error\n\
                 retry unix - - n - - error\ndiscard unix - - n - - discard\nanvil unix - - n - 1 anvil\n\
                 scache unix - - n - 1 scache\npostlog unix-dgram n - n - 1 postlogd\ntlsmgr unix - - n 1000? 1 tlsmgr\n"
            ),
        )
        .unwrap();
        let (st, out, err) = run("postfix", &["-c", etc.to_str().unwrap(), "start"]);
        if !st.success() {
            let (_, why, _) = run(
                "script",
                &[
                    "-qc",
                    &format!("postfix -c {} check", etc.display()),
                    "/dev/null",
                ],
            );
            panic!("postfix start failed: {out}{err}{why}");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postfix never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Postfix {
            etc,
            port,
            log: dir.join("maillog"),
            vmail: dir.join("vmail"),
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _stopped = run("postfix", &["-c", self.etc.to_str().unwrap(), "stop"]);
        if std::thread::panicking() {
            eprintln!(
                "--- postfix log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Reads a whole file as text (lossy).
pub fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
}

/// Runs a command to completion, returning (status, stdout, stderr).
/// Runs `program` with `input` on its standard input.
pub fn run_with_stdin(
    program: &str,
    args: &[&str],
    input: &str,
) -> (std::process::ExitStatus, String, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    // A program that exits without reading its input closes the pipe:
    // that is its business, not the test's.
    let _unread = child.stdin.take().unwrap().write_all(input.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A private Dovecot (Debian's dovecot-imapd) serving IMAP on 127.0.0.1
/// without TLS: users and passwords from `accounts` (passwd-file, argon2),
/// each user's Maildir at `root/DOMAIN/LOCALPART`, accessed as `nobody`.
pub fn dovecot(dir: &Path, accounts: &Path, root: &Path) -> (Proc, u16) {
    let port = free_port();
    let home = dir.join("dovecot");
    for sub in ["run", "state"] {
        std::fs::create_dir_all(home.join(sub)).unwrap();
    }
    let conf = home.join("dovecot.conf");
    std::fs::write(
        &conf,
        format!(
            "protocols = imap
             listen = 127.0.0.1
             base_dir = {run}
             state_dir = {state}
             log_path = /dev/stderr
             ssl = no
             disable_plaintext_auth = no
             auth_mechanisms = plain login
             mail_location = maildir:~
             passdb {{
  driver = passwd-file
  args = scheme=ARGON2ID username_format=%Lu {accounts}
}}
             userdb {{
  driver = static
  args = uid=65534 gid=65534 home={root}/%Ld/%Ln
}}
             service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
",
            run = home.join("run").display(),
            state = home.join("state").display(),
            accounts = accounts.display(),
            root = root.display(),
        ),
    )
    .unwrap();
    let p = Proc::spawn(
        "dovecot",
        dir,
        "/usr/sbin/dovecot",
        &["-F", "-c", conf.to_str().unwrap()],
        &[],
    );
    wait_port(port, Duration::from_secs(20), &p);
    (p, port)
}

pub fn run(program: &str, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One span as an OTLP receiver got it, flattened for assertions.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// The trace ids of the span's links.
    pub links: Vec<String>,
    /// String, integer and boolean attributes as text.
    pub attributes: std::collections::HashMap<String, String>,
}

/// A real OTLP/gRPC trace receiver (opentelemetry-proto's tonic service)
/// on 127.0.0.1, keeping every span it is sent.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Collector(std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            _ => String::new(),
        };
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(ReceivedSpan {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        links: s.links.iter().map(|l| hex(&l.trace_id)).collect(),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                    });
                }
            }
        }
        self.0.lock().unwrap().extend(got);
        Ok(tonic::Response::new(Default::default()))
    }
}

impl OtlpReceiver {
    pub fn start() -> OtlpReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let collector = Collector(spans.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(
                        opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(collector),
                    )
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        OtlpReceiver {
            addr,
            spans,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the spans received.
    pub fn wait(
        &self,
        within: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// GET `http://ADDR/PATH`: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}
