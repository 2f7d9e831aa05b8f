//! Ports and connections: free ports, a port where nothing listens ([`ClosedPort`]), waiting for a port, a connection from another loopback address, an HTTP GET.

use super::*;

/// A TCP connection to `to` from the loopback address `src` (Linux routes
/// all of 127/8 to lo: a test can be several clients).
pub fn connect_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
    if src == [127, 0, 0, 1] {
        return std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
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

pub(crate) fn free_udp_port() -> u16 {
    loop {
        let port = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
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
