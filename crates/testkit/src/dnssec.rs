//! A DNSSEC-signed test DNS: BIND's `named`, authoritative for a root zone
//! signed with `dnssec-signzone` and for unsigned zones delegated from it
//! without DS records (so proven insecure). A resolver given the root's
//! key as its trust anchor validates answers as it would the real root's.

use super::*;

/// A running signed DNS.
pub struct SignedDns {
    pub proc: Proc,
    pub port: u16,
    /// The root's key-signing DNSKEY record: the trust anchor file.
    pub anchor: PathBuf,
}

/// Starts `named` with a signed root zone holding the `signed` records
/// (zone-file lines with absolute names: `mx.a.test. A 127.0.0.1`) and an
/// unsigned zone per `unsigned` entry (its name and its lines, relative
/// or absolute). `tamper` is applied to the signed zone's text after
/// signing, to make answers bogus.
pub fn signed_dns(
    dir: &Path,
    signed: &[String],
    unsigned: &[(&str, &[String])],
    tamper: &dyn Fn(String) -> String,
) -> SignedDns {
    let dir = dir.join("named");
    std::fs::create_dir_all(&dir).unwrap();
    let d = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let soa = "$TTL 300\n@ IN SOA ns. hostmaster. 1 3600 600 86400 300\n@ IN NS ns.\n";
    let mut root = format!("{soa}ns. IN A 127.0.0.1\n");
    for line in signed {
        root.push_str(line);
        root.push('\n');
    }
    let mut zones = String::new();
    for (zone, lines) in unsigned {
        // Delegated without a DS record: insecure, as NSEC proves.
        root.push_str(&format!("{zone}. IN NS ns.\n"));
        let mut text = soa.to_string();
        for line in *lines {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(d(&format!("{zone}.zone")), text).unwrap();
        zones.push_str(&format!(
            "zone \"{zone}\" {{ type primary; file \"{}\"; }};\n",
            d(&format!("{zone}.zone"))
        ));
    }
    std::fs::write(d("root.zone"), root).unwrap();
    let keys = d("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for flags in [&["-f", "KSK"][..], &[][..]] {
        let mut args = vec!["-q", "-K", &keys, "-a", "ECDSAP256SHA256"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["-n", "ZONE", "."]);
        let (st, out, err) = run("dnssec-keygen", &args);
        assert!(st.success(), "dnssec-keygen: {out}{err}");
    }
    let signed_file = d("root.signed");
    let (st, out, err) = run(
        "dnssec-signzone",
        &[
            "-S",
            "-K",
            &keys,
            "-O",
            "full",
            // The dsset file goes beside the zone, not in the working
            // directory.
            "-d",
            &d(""),
            "-o",
            ".",
            "-f",
            &signed_file,
            &d("root.zone"),
        ],
    );
    assert!(st.success(), "dnssec-signzone: {out}{err}");
    let text = std::fs::read_to_string(&signed_file).unwrap();
    std::fs::write(&signed_file, tamper(text)).unwrap();

    // The trust anchor: the root's KSK (flags 257), comments dropped.
    let mut anchor = String::new();
    for entry in std::fs::read_dir(&keys).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "key") {
            for line in read(&path).lines() {
                if !line.starts_with(';') && line.contains("DNSKEY 257 ") {
                    anchor.push_str(line);
                    anchor.push('\n');
                }
            }
        }
    }
    assert!(!anchor.is_empty(), "no KSK made in {keys}");
    let anchor_file = dir.join("root-anchor.key");
    std::fs::write(&anchor_file, anchor).unwrap();

    let port = free_udp_port();
    std::fs::write(
        d("named.conf"),
        format!(
            "options {{\n  directory \"{dir}\";\n  listen-on port {port} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  recursion no;\n  dnssec-validation no;\n  notify no;\n  pid-file none;\n  session-keyfile none;\n}};\nzone \".\" {{ type primary; file \"{signed_file}\"; }};\n{zones}",
            dir = dir.display()
        ),
    )
    .unwrap();
    let proc = Proc::spawn(
        "named",
        &dir,
        "named",
        &["-g", "-4", "-c", &d("named.conf")],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "named never listened on 127.0.0.1:{port}\n{}",
            proc.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    SignedDns {
        proc,
        port,
        anchor: anchor_file,
    }
}

impl SignedDns {
    /// dnsmasq in front of it, as a cluster's forwarding resolver
    /// (CoreDNS's `forward`) stands in front of the real DNS: it asks
    /// `named` with DNSSEC records requested and passes them on
    /// (`proxy-dnssec`), validating nothing itself. Returns it and its
    /// port.
    pub fn forwarder(&self, dir: &Path) -> (Proc, u16) {
        let port = free_udp_port();
        let conf = dir.join("forwarder.conf");
        std::fs::write(
            &conf,
            format!(
                "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nno-daemon\nuser=root\npid-file=\nserver=127.0.0.1#{}\nproxy-dnssec\n",
                self.port
            ),
        )
        .unwrap();
        let p = Proc::spawn(
            "forwarder",
            dir,
            "dnsmasq",
            &[
                "--keep-in-foreground",
                &format!("--conf-file={}", conf.display()),
            ],
            &[],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "dnsmasq never listened on 127.0.0.1:{port}\n{}",
                p.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (p, port)
    }
}
