//! The PROXY protocol, versions 1 (text) and 2 (binary), as load balancers
//! send it before the client's first byte (haproxy's proxy-protocol.txt).
//! Only the addresses are used; a LOCAL (health check) header means the
//! connection is the proxy's own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 octets (proxy-protocol.txt §2.1).
const V1_MAX: usize = 107;

#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// The client's address as the proxy saw it.
    Proxied(SocketAddr),
    /// The proxy speaks for itself (health checks), or the family is
    /// unknown: keep the connection's own address.
    Local,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the header and its length.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'\r' {
        let n = buf.len().min(12);
        if buf[..n] != V2_SIGNATURE[..n] {
            return Err(ProxyError::Missing);
        }
        return parse_v2(buf);
    }
    if buf[0] == b'P' {
        let n = buf.len().min(6);
        if buf[..n] != b"PROXY "[..n] {
            return Err(ProxyError::Missing);
        }
        return parse_v1(buf);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Malformed("v1 line too long"));
        }
        return Ok(None);
    };
    if end + 2 > V1_MAX {
        return Err(ProxyError::Malformed("v1 line too long"));
    }
    let line =
        std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Malformed("v1 not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source address"))?;
            if (*fam == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Malformed("v1 family and address disagree"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Header::Proxied(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed("v1 fields")),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let header = match (ver_cmd & 0x0f, buf[13] >> 4) {
        (0, _) => Header::Local,
        (1, 1) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Header::Proxied(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        (1, 2) if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            Header::Proxied(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        (1, 0 | 3) => Header::Local,
        (1, _) => return Err(ProxyError::Malformed("v2 address block too short")),
        _ => return Err(ProxyError::Malformed("v2 command")),
    };
    Ok(Some((header, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn parses_headers_table() {
        let addr = |s: &str| Header::Proxied(s.parse().unwrap());
        let mut v4 = vec![192, 0, 2, 7, 10, 0, 0, 1];
        v4.extend_from_slice(&40000u16.to_be_bytes());
        v4.extend_from_slice(&25u16.to_be_bytes());
        let mut v6 = "2001:db8::9".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        v6.extend_from_slice(&[0; 16]);
        v6.extend_from_slice(&5555u16.to_be_bytes());
        v6.extend_from_slice(&25u16.to_be_bytes());
        type Parsed = Result<Option<(Header, usize)>, ProxyError>;
        let cases: Vec<(Vec<u8>, Parsed)> = vec![
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\nEHLO".to_vec(),
                Ok(Some((addr("192.0.2.7:40000"), 40))),
            ),
            (
                b"PROXY TCP6 2001:db8::9 ::1 5555 25\r\n".to_vec(),
                Ok(Some((addr("[2001:db8::9]:5555"), 36))),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), Ok(Some((Header::Local, 15)))),
            (b"PROXY TCP4 192.0.2.7 10.0".to_vec(), Ok(None)),
            (b"PRO".to_vec(), Ok(None)),
            (b"EHLO x\r\n".to_vec(), Err(ProxyError::Missing)),
            (
                b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(),
                Err(ProxyError::Malformed("v1 family and address disagree")),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 25\r\n".to_vec(),
                Err(ProxyError::Malformed("v1 source port")),
            ),
            (
                format!("PROXY {}\r\n", "x".repeat(200)).into_bytes(),
                Err(ProxyError::Malformed("v1 line too long")),
            ),
            (v2(1, 0x11, &v4), Ok(Some((addr("192.0.2.7:40000"), 28)))),
            (v2(1, 0x21, &v6), Ok(Some((addr("[2001:db8::9]:5555"), 52)))),
            (v2(0, 0x00, &[]), Ok(Some((Header::Local, 16)))),
            (v2(1, 0x11, &v4)[..20].to_vec(), Ok(None)),
            (
                v2(1, 0x11, &v4[..4]),
                Err(ProxyError::Malformed("v2 address block too short")),
            ),
            (v2(7, 0x11, &v4), Err(ProxyError::Malformed("v2 command"))),
        ];
        for (input, want) in cases {
            assert_eq!(parse(&input), want, "{:?}", String::from_utf8_lossy(&input));
        }
    }
}
