//! Real peers: aiosmtpd as a remote MX (plain, flaky, counting connections), an MTA-STS policy server, dnsmasq as DNS (on a port of its own, or on port 53 of a loopback address with a private resolv.conf), Postfix and Dovecot.

use super::*;
use std::net::Ipv4Addr;

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

/// dnsmasq answering for the given zone lines (`mx-host=…`, `address=…`);
/// returns it and its port.
pub fn dnsmasq(dir: &Path, lines: &[&str]) -> (Proc, u16) {
    let port = free_udp_port();
    let p = dnsmasq_on(dir, Ipv4Addr::LOCALHOST, port, lines);
    (p, port)
}

/// dnsmasq on port 53 of a loopback address of its own (127.53.x.y), for
/// programs that can only ask the system resolver: run them with
/// [`with_resolver`]. Returns it and its address.
pub fn dnsmasq_at_53(dir: &Path, lines: &[&str]) -> (Proc, Ipv4Addr) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let salt = std::process::id().wrapping_mul(251);
    loop {
        let n = salt.wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let ip = Ipv4Addr::new(127, 53, (n >> 8) as u8, (n as u8).max(1));
        let free = std::net::TcpListener::bind((ip, 53)).is_ok()
            && std::net::UdpSocket::bind((ip, 53)).is_ok();
        if free {
            return (dnsmasq_on(dir, ip, 53, lines), ip);
        }
    }
}

fn dnsmasq_on(dir: &Path, ip: Ipv4Addr, port: u16, lines: &[&str]) -> Proc {
    let conf = dir.join("dnsmasq.conf");
    let mut text = format!(
        "port={port}\nlisten-address={ip}\nbind-interfaces\nno-resolv\nno-hosts\nno-daemon\nuser=root\npid-file=\nlocal=/test/\n"
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((ip, port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "dnsmasq never listened on {ip}:{port}\n{}",
            p.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// The command line that runs `program` with `resolver` as its only name
/// server: in a mount namespace of its own, where a resolv.conf naming it
/// is mounted over /etc/resolv.conf (for programs with no setting of
/// their own, such as OpenDMARC). Needs root, as CI has.
pub fn with_resolver(dir: &Path, resolver: Ipv4Addr, program: &str, args: &[&str]) -> Vec<String> {
    let conf = dir.join("resolv.conf");
    std::fs::write(
        &conf,
        format!("nameserver {resolver}\noptions attempts:1 timeout:2\n"),
    )
    .unwrap();
    let mut cmd = vec![
        "-m".to_string(),
        "sh".to_string(),
        "-c".to_string(),
        format!(
            "mount --bind '{}' /etc/resolv.conf && exec \"$0\" \"$@\"",
            conf.display()
        ),
        program.to_string(),
    ];
    cmd.extend(args.iter().map(|a| a.to_string()));
    cmd
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
