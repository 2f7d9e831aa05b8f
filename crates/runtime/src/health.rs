//! The HTTP port every service has (`telemetry.listen`): `/livez`,
//! `/readyz` and `/metrics` (Prometheus text).
//!
//! Live: the process answers. Ready: not draining, and every check the
//! service registered (the broker, storage) passes within two seconds; the
//! answer names what failed. Kubernetes takes a pod that is not ready out
//! of its Service, which is what a draining ingress wants.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A readiness check: `Ok` or why not.
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What `/readyz` looks at.
pub struct Health {
    draining: CancellationToken,
    checks: Vec<(&'static str, Check)>,
    /// Said in the answer, never counted: a dependency this pod copes
    /// without (ingress answers `451` at RCPT while storage is away), so
    /// its absence must not take every replica out of the Service at once.
    advisory: Vec<(&'static str, Check)>,
}

impl Health {
    /// Ready until `draining` is cancelled, and while every check passes.
    pub fn new(draining: CancellationToken) -> Health {
        Health {
            draining,
            checks: Vec::new(),
            advisory: Vec::new(),
        }
    }

    /// A check readiness depends on.
    pub fn check(mut self, name: &'static str, check: Check) -> Health {
        self.checks.push((name, check));
        self
    }

    /// A check whose failure `/readyz` reports but does not count.
    pub fn advisory(mut self, name: &'static str, check: Check) -> Health {
        self.advisory.push((name, check));
        self
    }

    /// `Ok` with notes on advisory checks that fail, or why not ready.
    async fn ready(&self) -> Result<String, String> {
        if self.draining.is_cancelled() {
            return Err("draining".into());
        }
        let run = |check: &Check| {
            let f = check();
            async move {
                match tokio::time::timeout(Duration::from_secs(2), f).await {
                    Ok(r) => r,
                    Err(_) => Err("no answer within 2s".to_string()),
                }
            }
        };
        let mut failed = Vec::new();
        for (name, check) in &self.checks {
            if let Err(e) = run(check).await {
                failed.push(format!("{name}: {e}"));
            }
        }
        let mut notes = String::new();
        for (name, check) in &self.advisory {
            if let Err(e) = run(check).await {
                let _ = writeln!(notes, "{name} (not counted): {e}");
            }
        }
        if failed.is_empty() {
            Ok(notes)
        } else {
            Err(format!("{}\n{notes}", failed.join("\n"))
                .trim_end()
                .to_string())
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn answer(health: Arc<Health>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match health.ready().await {
            Ok(notes) => text(StatusCode::OK, format!("ready\n{notes}")),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/metrics" => {
            let body = crate::telemetry::collect()
                .map(|rm| prometheus_text(&rm))
                .unwrap_or_default();
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /livez, /readyz or /metrics\n".into(),
        ),
    }
}

/// Serves the port until `stop` is cancelled (after the service itself
/// has stopped, so probes are answered while it drains).
pub async fn serve(listener: TcpListener, health: Arc<Health>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "telemetry listening");
    }
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "telemetry accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(health, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

/// Binds `telemetry.listen` and serves it in the background; cancel the
/// returned token after the service has stopped.
pub async fn start(
    cfg: &crate::Config,
    health: Health,
) -> anyhow::Result<(CancellationToken, std::net::SocketAddr)> {
    let listener = TcpListener::bind(cfg.telemetry.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} (telemetry.listen): {e}",
            cfg.telemetry.listen
        )
    })?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, Arc::new(health), stop.clone()));
    Ok((stop, addr))
}

/// A metric name the Prometheus way: dots to underscores, the unit as a
/// suffix (`_seconds`, `_bytes`), `_total` on counters.
fn prometheus_name(name: &str, unit: &str, counter: bool) -> String {
    let mut n: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let suffix = match unit {
        "s" => "_seconds",
        "ms" => "_milliseconds",
        "By" => "_bytes",
        _ => "",
    };
    if !suffix.is_empty() && !n.ends_with(suffix) {
        n.push_str(suffix);
    }
    if counter && !n.ends_with("_total") {
        n.push_str("_total");
    }
    n
}

fn labels<'a>(attrs: impl Iterator<Item = &'a opentelemetry::KeyValue>, extra: &str) -> String {
    let mut parts: Vec<String> = attrs
        .map(|kv| {
            let key: String = kv
                .key
                .as_str()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let value = kv
                .value
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{key}=\"{value}\"")
        })
        .collect();
    parts.sort();
    if !extra.is_empty() {
        parts.push(extra.to_string());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

trait Num: Copy {
    fn f(self) -> f64;
}
impl Num for f64 {
    fn f(self) -> f64 {
        self
    }
}
impl Num for u64 {
    fn f(self) -> f64 {
        self as f64
    }
}
impl Num for i64 {
    fn f(self) -> f64 {
        self as f64
    }
}

fn render<T: Num>(out: &mut String, name: &str, unit: &str, help: &str, data: &MetricData<T>) {
    match data {
        MetricData::Sum(sum) => {
            let counter = sum.is_monotonic();
            let n = prometheus_name(name, unit, counter);
            let _ = writeln!(out, "# HELP {n} {help}");
            let kind = if counter { "counter" } else { "gauge" };
            let _ = writeln!(out, "# TYPE {n} {kind}");
            for p in sum.data_points() {
                let _ = writeln!(out, "{n}{} {}", labels(p.attributes(), ""), p.value().f());
            }
        }
        MetricData::Gauge(g) => {
            let n = prometheus_name(name, unit, false);
            let _ = writeln!(out, "# HELP {n} {help}");
            let _ = writeln!(out, "# TYPE {n} gauge");
            for p in g.data_points() {
                let _ = writeln!(out, "{n}{} {}", labels(p.attributes(), ""), p.value().f());
            }
        }
        MetricData::Histogram(h) => {
            let n = prometheus_name(name, unit, false);
            let _ = writeln!(out, "# HELP {n} {help}");
            let _ = writeln!(out, "# TYPE {n} histogram");
            for p in h.data_points() {
                let mut cumulative = 0u64;
                let bounds: Vec<f64> = p.bounds().collect();
                let counts: Vec<u64> = p.bucket_counts().collect();
                for (i, c) in counts.iter().enumerate() {
                    cumulative += c;
                    let le = bounds
                        .get(i)
                        .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                    let _ = writeln!(
                        out,
                        "{n}_bucket{} {cumulative}",
                        labels(p.attributes(), &format!("le=\"{le}\""))
                    );
                }
                let l = labels(p.attributes(), "");
                let _ = writeln!(out, "{n}_sum{l} {}", p.sum().f());
                let _ = writeln!(out, "{n}_count{l} {}", p.count());
            }
        }
        // Not used by Correu's instruments.
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// The Prometheus text exposition of everything collected, and of the
/// histograms declared but not yet used (empty: every bucket 0).
pub fn prometheus_text(rm: &ResourceMetrics) -> String {
    let mut out = String::new();
    let mut seen = std::collections::HashSet::new();
    for scope in rm.scope_metrics() {
        for m in scope.metrics() {
            seen.insert(m.name().to_string());
            let help = m.description().replace('\n', " ");
            match m.data() {
                AggregatedMetrics::F64(d) => render(&mut out, m.name(), m.unit(), &help, d),
                AggregatedMetrics::U64(d) => render(&mut out, m.name(), m.unit(), &help, d),
                AggregatedMetrics::I64(d) => render(&mut out, m.name(), m.unit(), &help, d),
            }
        }
    }
    for h in crate::metrics::declared() {
        if seen.contains(h.name) {
            continue;
        }
        let n = prometheus_name(h.name, h.unit, false);
        let _ = writeln!(out, "# HELP {n} {}", h.description);
        let _ = writeln!(out, "# TYPE {n} histogram");
        for b in &h.bounds {
            let _ = writeln!(out, "{n}_bucket{{le=\"{b}\"}} 0");
        }
        let _ = writeln!(out, "{n}_bucket{{le=\"+Inf\"}} 0");
        let _ = writeln!(out, "{n}_sum 0");
        let _ = writeln!(out, "{n}_count 0");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_prometheus_way() {
        assert_eq!(
            prometheus_name("correu.smtp.transactions", "{transaction}", true),
            "correu_smtp_transactions_total"
        );
        assert_eq!(
            prometheus_name("correu.queue.publish.duration", "s", false),
            "correu_queue_publish_duration_seconds"
        );
        assert_eq!(
            prometheus_name("correu.smtp.message.size", "By", false),
            "correu_smtp_message_size_bytes"
        );
    }
}
