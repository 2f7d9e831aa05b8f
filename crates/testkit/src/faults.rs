//! Faults: a TCP proxy ([`FaultProxy`]) a test can cut or stall.

use super::*;

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
