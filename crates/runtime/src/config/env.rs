//! The environment overlay: `CORREU_<SECTION>_<KEY>` variables set keys
//! over the file.
//!
//! A Kubernetes pod also gets variables it did not ask for: for every
//! Service in its namespace the kubelet adds `<NAME>_SERVICE_HOST`,
//! `<NAME>_SERVICE_PORT[_<PORT NAME>]`, `<NAME>_PORT` and
//! `<NAME>_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]`, the name upper-cased
//! with `-` as `_`. A release called `correu` has Services `correu-ingress`
//! and `correu-storage`, so its pods see `CORREU_INGRESS_PORT=tcp://…` and
//! `CORREU_STORAGE_SERVICE_HOST=…`. Those are not settings: a variable of
//! that shape that names no key is set aside (and said at debug level),
//! and one whose value is a service link (`tcp://10.96.0.10:25`) is set
//! aside even where its name happens to be a key.

use std::collections::BTreeMap;

use super::{ConfigError, err};

/// The sections a `CORREU_<SECTION>_<KEY>` variable may name.
const SECTIONS: [&str; 6] = ["smtp", "queue", "storage", "delivery", "redis", "telemetry"];
/// Variables that are not configuration keys.
const NOT_KEYS: [&str; 3] = ["CORREU_LOG", "CORREU_LOG_FORMAT", "CORREU_CONFIG"];

/// What the overlay did: the variable behind each key it set, the
/// variables it set aside as Kubernetes service links, and its errors.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    /// Dotted key → the variable that set it.
    pub sources: BTreeMap<String, String>,
    /// Dotted keys set by variables shaped like service links: when such a
    /// key turns out to be unknown, it is not an error.
    pub link_shaped: BTreeMap<String, String>,
    /// Service-link variables set aside before they were applied.
    pub set_aside: Vec<String>,
    pub errors: Vec<ConfigError>,
}

/// Applies every `CORREU_…` variable of `env` to `root`.
pub(crate) fn apply(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Overlay {
    let mut out = Overlay::default();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("CORREU_") else {
            continue;
        };
        if NOT_KEYS.contains(&name.as_str()) {
            continue;
        }
        let link_shaped = is_service_link_name(&name);
        if link_shaped && is_service_link_value(&value) {
            out.set_aside.push(name);
            continue;
        }
        let key = rest.to_ascii_lowercase();
        let path: Vec<String> = match SECTIONS
            .iter()
            .find(|s| key.strip_prefix(*s).is_some_and(|r| r.starts_with('_')))
        {
            Some(section) => vec![section.to_string(), key[section.len() + 1..].to_string()],
            None => vec![key],
        };
        let dotted = path.join(".");
        if let Err(m) = set_path(root, &path, parse_value(&value)) {
            if link_shaped {
                out.set_aside.push(name);
            } else {
                out.errors.push(err(format!("{dotted} (from {name})"), m));
            }
            continue;
        }
        if link_shaped {
            out.link_shaped.insert(dotted.clone(), name.clone());
        }
        out.sources.insert(dotted, name);
    }
    out
}

/// Does `name` have the shape of a variable the kubelet makes for a
/// Service? `X_SERVICE_HOST`, `X_SERVICE_PORT`, `X_SERVICE_PORT_NAME`,
/// `X_PORT`, `X_PORT_25_TCP`, `X_PORT_25_TCP_PROTO|_PORT|_ADDR`.
pub(crate) fn is_service_link_name(name: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.ends_with("_SERVICE_PORT") {
        return true;
    }
    if name.contains("_SERVICE_PORT_") {
        return true;
    }
    if name.ends_with("_PORT") {
        return true;
    }
    // ..._PORT_<digits>_<TCP|UDP|SCTP>[_PROTO|_PORT|_ADDR]
    let parts: Vec<&str> = name.split('_').collect();
    parts.windows(3).any(|w| {
        w[0] == "PORT"
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && matches!(w[2], "TCP" | "UDP" | "SCTP")
    })
}

/// `tcp://10.96.0.10:25`, `udp://…`, `sctp://…`: the value of `X_PORT` and
/// `X_PORT_25_TCP`, never a Correu setting.
fn is_service_link_value(value: &str) -> bool {
    ["tcp://", "udp://", "sctp://"]
        .iter()
        .any(|p| value.starts_with(p))
}

fn parse_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = root;
    for p in parents {
        let entry = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_link_names() {
        for name in [
            "CORREU_INGRESS_SERVICE_HOST",
            "CORREU_INGRESS_SERVICE_PORT",
            "CORREU_INGRESS_SERVICE_PORT_SMTP",
            "CORREU_INGRESS_PORT",
            "CORREU_INGRESS_PORT_25_TCP",
            "CORREU_INGRESS_PORT_25_TCP_PROTO",
            "CORREU_INGRESS_PORT_25_TCP_PORT",
            "CORREU_INGRESS_PORT_25_TCP_ADDR",
            "CORREU_STORAGE_PORT_2526_TCP_ADDR",
            "CORREU_REDIS_PORT",
            "CORREU_DELIVERY_MX_PORT",
        ] {
            assert!(is_service_link_name(name), "{name}");
        }
        for name in [
            "CORREU_SMTP_LISTEN",
            "CORREU_QUEUE_URL",
            "CORREU_DOMAINS",
            "CORREU_SMTP_MAX_HOPS",
            "CORREU_PORTAL_X",
        ] {
            assert!(!is_service_link_name(name), "{name}");
        }
    }
}
