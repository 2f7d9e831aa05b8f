//! SMTP clients: a raw one ([`Smtp`]) that sends exactly the bytes given, a load of messages over several threads, and swaks.

use super::*;

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

    /// The connection, to write to it byte by byte; nothing unread may
    /// be pending.
    pub fn into_stream(self) -> TcpStream {
        assert!(
            self.buf.is_empty(),
            "unread replies: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.stream
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

/// The queue id in a `250 2.0.0 Ok: queued as ID` reply.
pub fn queue_id(r: &Reply) -> String {
    assert_eq!(r.code, 250, "not queued: {r}");
    r.text().rsplit(' ').next().unwrap().to_string()
}
