//! A test PKI: a CA and server certificates signed by it ([`TestCert`]).

use super::*;

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

/// A new RSA-2048 key at `path` (PEM), and its DKIM record
/// (`v=DKIM1; k=rsa; p=…`), as an operator's openssl makes them.
pub fn dkim_rsa_key(path: &Path) -> String {
    let (st, _, err) = run(
        "openssl",
        &["genrsa", "-out", path.to_str().unwrap(), "2048"],
    );
    assert!(st.success(), "openssl genrsa: {err}");
    dkim_rsa_record(path)
}

/// The DKIM record of the RSA key at `path`.
pub fn dkim_rsa_record(path: &Path) -> String {
    let (st, pubkey, err) = run(
        "sh",
        &[
            "-c",
            &format!(
                "openssl rsa -in {} -pubout -outform DER 2>/dev/null | base64 -w0",
                path.display()
            ),
        ],
    );
    assert!(
        st.success() && !pubkey.trim().is_empty(),
        "openssl rsa: {err}"
    );
    format!("v=DKIM1; k=rsa; p={}", pubkey.trim())
}
