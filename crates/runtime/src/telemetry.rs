//! Logs, traces and metrics, set up once per process.
//!
//! Logs: the level comes from `CORREU_LOG`, else `RUST_LOG`, else `info`;
//! they go to standard error, human-readable on a terminal and as JSON
//! lines elsewhere (or as `CORREU_LOG_FORMAT=json|text` says). Operator
//! commands log warnings and errors only, as text, unless `-v`
//! ([`init_cli`]). A log line
//! inside a message's span carries its queue id and trace id.
//!
//! Traces, metrics and logs follow OpenTelemetry's standard environment:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or the `_TRACES_`/`_METRICS_`/`_LOGS_`
//! variants) turns the OTLP exporters on, unless `OTEL_TRACES_EXPORTER`,
//! `OTEL_METRICS_EXPORTER` or `OTEL_LOGS_EXPORTER` says `none`; headers
//! and timeouts (`OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`, per signal too)
//! are the exporters' own reading, `OTEL_EXPORTER_OTLP_PROTOCOL` is `grpc`
//! (default) or `http/protobuf`, `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` name the resource, `OTEL_TRACES_SAMPLER`
//! samples. With no endpoint there is no exporter and no span is sent
//! anywhere. Metrics are always kept in memory for `/metrics`
//! (Prometheus text, see [`crate::health`]).
//!
//! Trace context crosses processes as W3C `traceparent`: [`inject`] and
//! [`extract`] move it through any string map (the queued envelope, AMQP
//! headers, gRPC metadata).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What [`init`] set up; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: SdkMeterProvider,
    logs: Option<SdkLoggerProvider>,
}

/// Set when this process exports no traces (its spans carry ids only).
static IDS_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The in-memory reader `/metrics` renders.
static PROMETHEUS: OnceLock<Arc<ManualReader>> = OnceLock::new();

/// A [`ManualReader`] shared between the meter provider and `/metrics`.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The resource: service name (`OTEL_SERVICE_NAME`, else the binary's
/// role) and version, `OTEL_RESOURCE_ATTRIBUTES`, and the Kubernetes pod
/// and namespace when the chart passes them (`POD_NAME`, `POD_NAMESPACE`).
fn resource(service: &'static str) -> Resource {
    let mut b = Resource::builder().with_service_name(service);
    // The builder's detectors read OTEL_SERVICE_NAME and
    // OTEL_RESOURCE_ATTRIBUTES; the service name above is the fallback.
    if let Some(name) = env("OTEL_SERVICE_NAME") {
        b = b.with_service_name(name);
    }
    b = b.with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    for (var, key) in [
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
        ("NODE_NAME", "k8s.node.name"),
    ] {
        if let Some(v) = env(var) {
            b = b.with_attribute(opentelemetry::KeyValue::new(key, v));
        }
    }
    b.build()
}

/// `grpc` or `http/protobuf` for a signal (`TRACES`, `METRICS` or `LOGS`).
fn protocol(signal: &str) -> String {
    env(&format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "grpc".into())
}

/// Whether a signal (`TRACES`, `METRICS` or `LOGS`) is exported: an OTLP endpoint
/// is set for it, and `OTEL_{signal}_EXPORTER` (a list, as the
/// specification has it) does not say `none`. An exporter Correu lacks is
/// named in `problems` and ignored.
fn exporting(signal: &str, problems: &mut Vec<String>) -> bool {
    let var = format!("OTEL_{signal}_EXPORTER");
    if let Some(list) = env(&var) {
        let mut otlp = false;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "none" => return false,
                "otlp" => otlp = true,
                other => problems.push(format!(
                    "{var}={other:?}: Correu exports otlp (or none); ignored"
                )),
            }
        }
        if !otlp {
            return false;
        }
    }
    env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).is_some()
}

fn span_exporter() -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    Ok(match protocol("TRACES").as_str() {
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()?,
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?,
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: Correu speaks grpc and http/protobuf"
        ),
    })
}

fn log_exporter() -> anyhow::Result<opentelemetry_otlp::LogExporter> {
    Ok(match protocol("LOGS").as_str() {
        "http/protobuf" => opentelemetry_otlp::LogExporter::builder()
            .with_http()
            .build()?,
        "grpc" => opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .build()?,
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: Correu speaks grpc and http/protobuf"
        ),
    })
}

fn metric_exporter() -> anyhow::Result<opentelemetry_otlp::MetricExporter> {
    Ok(match protocol("METRICS").as_str() {
        "http/protobuf" => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .build()?,
        "grpc" => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()?,
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: Correu speaks grpc and http/protobuf"
        ),
    })
}

/// Installs logging, and tracing and metrics export when the environment
/// asks for them. Call it inside the Tokio runtime (the exporters run on
/// it). A second call only returns another handle on the first set-up.
pub fn init(service: &'static str) -> Telemetry {
    let filter = std::env::var("CORREU_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("CORREU_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let t = init_with(service, filter, json);
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        crate::metrics::register_process(handle);
    }
    t
}

/// The level an operator's command logs at: `warn` and above by default,
/// `info` with `-v`, `debug` with `-vv`, `trace` with `-vvv`.
pub fn cli_level(verbosity: u8) -> &'static str {
    match verbosity {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    }
}

/// As [`init`], for an operator's command (`correu queue`, `account`,
/// `alias`, `mailbox`): the command prints what was asked for, and logs
/// only warnings and errors unless `-v` asks for more ([`cli_level`]).
/// `CORREU_LOG` and `RUST_LOG` are the services' and are not read here
/// (a shell in a service's pod or unit inherits them). Logs are text on
/// standard error unless `CORREU_LOG_FORMAT=json`.
pub fn init_cli(service: &'static str, verbosity: u8) -> Telemetry {
    let json = matches!(std::env::var("CORREU_LOG_FORMAT").as_deref(), Ok("json"));
    init_with(service, EnvFilter::new(cli_level(verbosity)), json)
}

fn init_with(service: &'static str, filter: EnvFilter, json: bool) -> Telemetry {
    let resource = resource(service);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let mut problems = Vec::new();
    let tracer = if exporting("TRACES", &mut problems) {
        match span_exporter() {
            Ok(exporter) => {
                let processor =
                    opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                        exporter,
                        opentelemetry_sdk::runtime::Tokio,
                    )
                    .build();
                Some(
                    SdkTracerProvider::builder()
                        .with_span_processor(processor)
                        .with_resource(resource.clone())
                        .build(),
                )
            }
            Err(e) => {
                problems.push(format!("traces are not exported: {e}"));
                None
            }
        }
    } else {
        None
    };
    // Without an exporter, spans still get trace and span ids (for the
    // log lines written inside them and the traceparent passed on), from
    // a layer that does only that: OpenTelemetry's layer and SDK, even
    // sampling nothing, cost `correu serve` 15 % more CPU per message
    // (scripts/bench-compare).
    let ids = tracer.is_none().then(|| {
        IDS_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
        IdsLayer
    });

    let reader = PROMETHEUS
        .get_or_init(|| Arc::new(ManualReader::builder().build()))
        .clone();
    let resource_for_logs = resource.clone();
    let mut meter = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(SharedReader(reader));
    if exporting("METRICS", &mut problems) {
        match metric_exporter() {
            Ok(exporter) => {
                let interval = env("OTEL_METRIC_EXPORT_INTERVAL")
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis)
                    .unwrap_or(Duration::from_secs(60));
                meter = meter.with_reader(
                    opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
                        exporter,
                        opentelemetry_sdk::runtime::Tokio,
                    )
                    .with_interval(interval)
                    .build(),
                );
            }
            Err(e) => problems.push(format!("metrics are not exported: {e}")),
        }
    }
    let meter = meter.build();
    opentelemetry::global::set_meter_provider(meter.clone());

    // Log records to OTLP (the logs bridge), beside standard error.
    let logs = if exporting("LOGS", &mut problems) {
        match log_exporter() {
            Ok(exporter) => Some(
                SdkLoggerProvider::builder()
                    .with_resource(resource_for_logs)
                    .with_log_processor(
                        opentelemetry_sdk::logs::log_processor_with_async_runtime::BatchLogProcessor::builder(
                            exporter,
                            opentelemetry_sdk::runtime::Tokio,
                        )
                        .build(),
                    )
                    .build(),
            ),
            Err(e) => {
                problems.push(format!("logs are not exported: {e}"));
                None
            }
        }
    } else {
        None
    };
    // Not the exporters' own events: a failing export would log, and that
    // log be exported, again and again.
    let bridge = logs.as_ref().map(|l| {
        use tracing_subscriber::Layer as _;
        opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(l).with_filter(
            tracing_subscriber::filter::filter_fn(|m| {
                !["opentelemetry", "tonic", "h2", "hyper", "tower", "reqwest"]
                    .iter()
                    .any(|p| m.target().starts_with(p))
            }),
        )
    });

    let otel = tracer.as_ref().map(|t| {
        // No code location, thread or busy/idle time on spans: a few
        // allocations and clock reads per span that no attribute of
        // Correu's needs (the README's tables list what spans carry).
        tracing_opentelemetry::layer()
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_tracer(t.tracer("correu"))
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(ids)
        .with(bridge);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(WithIds(
                        tracing_subscriber::fmt::format().json().flatten_event(true),
                    ))
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    if result.is_ok() {
        tracing::debug!(service, "telemetry started");
        for p in problems {
            tracing::warn!("{p}");
        }
    }
    Telemetry {
        tracer,
        meter,
        logs,
    }
}

/// A JSON log line with the trace and span ids of the span it was
/// written in as its first fields (`trace_id`, `span_id`, W3C hex), so
/// logs alone can be joined to traces.
struct WithIds<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = ctx.lookup_current().and_then(|span| {
            let ext = span.extensions();
            if let Some(ids) = ext.get::<Ids>() {
                return Some((ids.trace, ids.span));
            }
            let data = ext.get::<tracing_opentelemetry::OtelData>()?;
            Some((data.trace_id()?, data.span_id()?))
        });
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        match (ids, line.strip_prefix('{')) {
            (Some((t, s)), Some(rest)) if t != opentelemetry::TraceId::INVALID => {
                write!(writer, "{{\"trace_id\":\"{t}\",\"span_id\":\"{s}\",{rest}")
            }
            _ => writer.write_str(&line),
        }
    }
}

impl Telemetry {
    /// Sends what is buffered and stops the exporters.
    pub async fn shutdown(self) {
        let Telemetry {
            tracer,
            meter,
            logs,
        } = self;
        // The providers' shutdown waits on the exporters, which run on
        // this runtime: wait for it off the async threads.
        let done = tokio::task::spawn_blocking(move || {
            if let Some(t) = tracer {
                let _flushed = t.shutdown();
            }
            let _flushed = meter.shutdown();
            if let Some(l) = logs {
                let _flushed = l.shutdown();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
    }
}

/// Everything the meters hold now, for `/metrics`.
pub fn collect() -> Option<ResourceMetrics> {
    let reader = PROMETHEUS.get()?;
    let mut rm = ResourceMetrics::default();
    reader.collect(&mut rm).ok()?;
    Some(rm)
}

/// The current span's trace context as W3C headers (`traceparent`,
/// `tracestate`).
pub fn inject() -> HashMap<String, String> {
    let current = tracing::Span::current();
    if let Some((trace, span)) = ids_of(&current) {
        // A process that exports nothing samples nothing, but it is not
        // its call: the next process decides.
        return HashMap::from([("traceparent".to_string(), format!("00-{trace}-{span}-01"))]);
    }
    let cx = current.context();
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out
}

/// Makes the trace context in `headers` the parent of `span` (call it
/// before `span` has children).
pub fn extract_into(span: &tracing::Span, headers: &HashMap<String, String>) {
    if headers.is_empty() {
        return;
    }
    if IDS_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        let remote = headers
            .get("traceparent")
            .and_then(|tp| tp.split('-').nth(1))
            .and_then(|t| opentelemetry::TraceId::from_hex(t).ok())
            .filter(|t| *t != opentelemetry::TraceId::INVALID);
        if let Some(trace) = remote {
            with_ids(span, |ids| ids.trace = trace);
        }
        return;
    }
    let cx = TraceContextPropagator::new().extract(headers);
    let _ = span.set_parent(cx);
}

/// A span's ids where no tracer exports ([`IdsLayer`]).
#[derive(Debug, Clone, Copy)]
struct Ids {
    trace: opentelemetry::TraceId,
    span: opentelemetry::SpanId,
}

/// Gives each span a span id, and the trace id of its parent (a new one
/// for a root span): all OpenTelemetry's layer would give the logs, at
/// the cost of two random numbers.
struct IdsLayer;

impl<S> tracing_subscriber::Layer<S> for IdsLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        _attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let inherited = span
            .parent()
            .and_then(|p| p.extensions().get::<Ids>().map(|i| i.trace));
        let trace = inherited.unwrap_or_else(|| {
            opentelemetry::TraceId::from_bytes(rand::random::<u128>().max(1).to_be_bytes())
        });
        let span_id = opentelemetry::SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes());
        span.extensions_mut().insert(Ids {
            trace,
            span: span_id,
        });
    }
}

/// Runs `f` on `span`'s ids, when [`IdsLayer`] gave it some.
fn with_ids(span: &tracing::Span, f: impl FnOnce(&mut Ids)) {
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>()
            && let Some(s) = tracing_subscriber::registry::LookupSpan::span(registry, id)
            && let Some(ids) = s.extensions_mut().get_mut::<Ids>()
        {
            f(ids);
        }
    });
}

/// `span`'s (trace id, span id) from [`IdsLayer`].
fn ids_of(span: &tracing::Span) -> Option<(opentelemetry::TraceId, opentelemetry::SpanId)> {
    let mut got = None;
    with_ids(span, |ids| got = Some((ids.trace, ids.span)));
    got
}

/// The span context of `span`, when it is traced.
pub fn span_context(span: &tracing::Span) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Links `span` to another span (one not its parent).
pub fn add_link(span: &tracing::Span, to: opentelemetry::trace::SpanContext) {
    span.add_link(to);
}

/// The trace id of `span` in hex, when it is traced.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    if let Some((trace, _)) = ids_of(span) {
        return Some(trace.to_string());
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
