//! What every TLS connection of Correu's says about itself in logs and
//! `Received:` headers, for the server side and the client side alike.

/// "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384".
pub fn describe(conn: &rustls::CommonState) -> String {
    let version = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("TLS")
        .replace('_', ".");
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .unwrap_or("unknown");
    format!("{version} with cipher {cipher}")
}
