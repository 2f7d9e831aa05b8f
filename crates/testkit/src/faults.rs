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

/// Holds what the server sends only (requests still reach it).
const STALL_REPLIES: u8 = 3;

fn holds(mode: u8, from_server: bool) -> bool {
    mode == STALL || (from_server && mode == STALL_REPLIES)
}

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
                for (from, to, from_server) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let (m, g) = (m.clone(), g.clone());
                    std::thread::spawn(move || pump(from, to, m, g, born, from_server));
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

    /// Holds every byte from the server only: a broker that takes the
    /// messages and acts on them, but whose confirms never arrive.
    pub fn stall_replies(&self) {
        self.mode.store(STALL_REPLIES, Ordering::SeqCst);
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
    from_server: bool,
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
        if holds(mode.load(Ordering::SeqCst), from_server) {
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
                while holds(mode.load(Ordering::SeqCst), from_server) {
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

/// A small tmpfs mounted at `dir` (root only, as the tests run), so a test
/// can fill a disk and free it again; unmounted when dropped.
pub struct SmallDisk {
    pub dir: PathBuf,
    filler: PathBuf,
}

impl SmallDisk {
    pub fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let (st, out, err) = run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        assert!(st.success(), "mount tmpfs at {}: {out}{err}", dir.display());
        SmallDisk {
            dir: dir.to_path_buf(),
            filler: dir.join(".filler"),
        }
    }

    /// Fills the disk to the last byte.
    pub fn fill(&self) {
        let mut f = std::fs::File::create(&self.filler).unwrap();
        let block = vec![0u8; 64 << 10];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.dir.display()),
            }
        }
        // The last partial block.
        let _ = f.write(&[0u8; 1]);
    }

    /// Gives the space back.
    pub fn free(&self) {
        std::fs::remove_file(&self.filler).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _unmounted = run("umount", &["-l", self.dir.to_str().unwrap()]);
    }
}
