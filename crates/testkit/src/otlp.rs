//! A real OTLP/gRPC trace receiver ([`OtlpReceiver`]) for assertions on spans.

use super::*;

/// One span as an OTLP receiver got it, flattened for assertions.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// The trace ids of the span's links.
    pub links: Vec<String>,
    /// String, integer and boolean attributes as text.
    pub attributes: std::collections::HashMap<String, String>,
    /// Each attribute's OTLP type: `string`, `int`, `bool`, `double`.
    pub attribute_types: std::collections::HashMap<String, &'static str>,
    /// `SERVER`, `CLIENT`, `PRODUCER`, `CONSUMER`, `INTERNAL`.
    pub kind: &'static str,
    /// `UNSET`, `OK` or `ERROR`, and the status message.
    pub status: &'static str,
    pub status_message: String,
}

/// One log record as an OTLP receiver got it.
#[derive(Debug, Clone)]
pub struct ReceivedLog {
    pub service: String,
    pub severity: String,
    pub body: String,
    /// Hex; empty when the record was written outside any span.
    pub trace_id: String,
    pub span_id: String,
    pub attributes: std::collections::HashMap<String, String>,
}

/// A real OTLP/gRPC receiver (opentelemetry-proto's tonic services) on
/// 127.0.0.1, keeping every span and log record it is sent, counting
/// metric exports, and noting the `x-…` request headers of trace exports.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    logs: std::sync::Arc<std::sync::Mutex<Vec<ReceivedLog>>>,
    headers: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    metric_exports: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Collector(
    std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
);

/// Keeps the log records it is sent.
struct LogsCollector(std::sync::Arc<std::sync::Mutex<Vec<ReceivedLog>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService
    for LogsCollector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse>,
        tonic::Status,
    > {
        let mut got = Vec::new();
        for rl in request.into_inner().resource_logs {
            let service = service_of(&rl.resource);
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    got.push(ReceivedLog {
                        service: service.clone(),
                        severity: r.severity_text.clone(),
                        body: any_text(&r.body),
                        trace_id: hex(&r.trace_id),
                        span_id: hex(&r.span_id),
                        attributes: r
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), any_text(&a.value)))
                            .collect(),
                    });
                }
            }
        }
        self.0.lock().unwrap().extend(got);
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Bytes (an id) in lower-case hex.
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `service.name` of a resource.
fn service_of(r: &Option<opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    r.as_ref()
        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
        .map(|a| any_text(&a.value))
        .unwrap_or_default()
}

/// An OTLP value as text.
fn any_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// Counts the metric exports it is sent.
struct MetricsCollector(std::sync::Arc<std::sync::atomic::AtomicUsize>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for MetricsCollector
{
    async fn export(
        &self,
        _request: tonic::Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let text = any_text;
        {
            let mut h = self.1.lock().unwrap();
            for kv in request.metadata().iter() {
                if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv
                    && k.as_str().starts_with("x-")
                {
                    h.push((k.as_str().to_string(), v.to_str().unwrap_or("").to_string()));
                }
            }
        }
        let kind_of = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(_)) => "string",
            Some(Value::IntValue(_)) => "int",
            Some(Value::BoolValue(_)) => "bool",
            Some(Value::DoubleValue(_)) => "double",
            _ => "other",
        };
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = service_of(&rs.resource);
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(ReceivedSpan {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        links: s.links.iter().map(|l| hex(&l.trace_id)).collect(),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                        attribute_types: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), kind_of(&a.value)))
                            .collect(),
                        kind: match s.kind {
                            1 => "INTERNAL",
                            2 => "SERVER",
                            3 => "CLIENT",
                            4 => "PRODUCER",
                            5 => "CONSUMER",
                            _ => "UNSPECIFIED",
                        },
                        status: match s.status.as_ref().map_or(0, |st| st.code) {
                            1 => "OK",
                            2 => "ERROR",
                            _ => "UNSET",
                        },
                        status_message: s
                            .status
                            .as_ref()
                            .map(|st| st.message.clone())
                            .unwrap_or_default(),
                    });
                }
            }
        }
        self.0.lock().unwrap().extend(got);
        Ok(tonic::Response::new(Default::default()))
    }
}

impl OtlpReceiver {
    pub fn start() -> OtlpReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let headers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let metric_exports = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let collector = Collector(spans.clone(), headers.clone());
        let log_collector = LogsCollector(logs.clone());
        let metrics = MetricsCollector(metric_exports.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(
                        opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(collector),
                    )
                    .add_service(
                        opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer::new(metrics),
                    )
                    .add_service(
                        opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsServiceServer::new(log_collector),
                    )
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        OtlpReceiver {
            addr,
            spans,
            logs,
            headers,
            metric_exports,
            _stop: stop,
        }
    }

    /// Every log record so far.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.logs.lock().unwrap().clone()
    }

    /// The `x-…` headers trace exports came with.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.headers.lock().unwrap().clone()
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many metric exports arrived.
    pub fn metric_exports(&self) -> usize {
        self.metric_exports
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the spans received.
    pub fn wait(
        &self,
        within: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
