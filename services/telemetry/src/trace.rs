//! OpenTelemetry traces: the OTLP pipeline the `OTEL_*` variables
//! configure, the W3C trace context (`traceparent`) a request carries or an
//! event stores, and how a span joins or links to those traces.
//!
//! Spans are `tracing` spans; the OpenTelemetry layer turns them into OTLP
//! spans with their fields as attributes. Every span that belongs to a
//! trace records its trace id in a `trace_id` field, so the log lines
//! inside it carry the id too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, global};
use opentelemetry_otlp::{ExporterBuildError, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor};
use tracing::Span;
use tracing::field::display;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt as _};
use tracing_subscriber::registry::LookupSpan;

/// The metadata key (and header) that holds an event's W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Most traces one projector batch links to; OpenTelemetry's default span
/// limit drops links past 128 anyway.
pub const MAX_LINKS: usize = 128;

/// The name of a projector batch's span.
pub const BATCH_SPAN: &str = "projector.batch";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Spans are being exported (an OTLP exporter or a test's is installed).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The OTLP exporter the standard variables ask for, or `None` when traces
/// are off: `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`, or
/// neither `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
/// nor `OTEL_TRACES_EXPORTER=otlp` set. The exporter speaks gRPC (the
/// only OTLP transport built in); it reads the endpoint, headers and
/// timeout variables itself.
pub fn exporter_from_env() -> Result<Option<SpanExporter>, ExporterBuildError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match var("OTEL_TRACES_EXPORTER").as_deref() {
        Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(ExporterBuildError::InternalFailure(format!(
                "OTEL_TRACES_EXPORTER={other:?}: only \"otlp\" and \"none\" are built in"
            )));
        }
        None if var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() =>
        {
            return Ok(None);
        }
        None => {}
    }
    let protocol =
        var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(protocol) = protocol
        && protocol != "grpc"
    {
        return Err(ExporterBuildError::InternalFailure(format!(
            "OTLP protocol {protocol:?}: only \"grpc\" is built in"
        )));
    }
    SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()
        .map(Some)
}

/// A batching pipeline to `exporter`, as `OTEL_BSP_*` tune it, sampled
/// as `OTEL_TRACES_SAMPLER` says (default: follow the parent, else
/// sample), for the service `OTEL_SERVICE_NAME` names (default
/// `eventplane`).
pub fn provider(exporter: SpanExporter) -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_span_processor(SkipIdleBatches(
            BatchSpanProcessor::builder(exporter).build(),
        ))
        .with_resource(resource())
        .build()
}

/// Drops the spans of projector batches that found no events: an idle
/// projector looks for work every few hundred milliseconds, and a trace
/// of each look would bury the batches that did something.
#[derive(Debug)]
pub struct SkipIdleBatches<P>(pub P);

impl<P: SpanProcessor> SpanProcessor for SkipIdleBatches<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.0.on_start(span, cx)
    }

    fn on_end(&self, span: SpanData) {
        let idle = span.name == BATCH_SPAN
            && span
                .attributes
                .iter()
                .any(|kv| kv.key.as_str() == "events" && kv.value == opentelemetry::Value::I64(0));
        if !idle {
            self.0.on_end(span)
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource)
    }
}

/// This process as a traced service: `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES` when set.
pub fn resource() -> Resource {
    let builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name("eventplane").build()
    }
}

/// The layer that turns `tracing` spans into OpenTelemetry spans.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    EXPORTING.store(true, Ordering::Relaxed);
    tracing_opentelemetry::layer().with_tracer(provider.tracer("eventplane"))
}

/// W3C trace context is how traces cross processes, HTTP and the event log.
pub fn install_propagator() {
    global::set_text_map_propagator(TraceContextPropagator::new());
}

/// The trace context `carrier` holds (invalid when it holds none, or a
/// malformed one).
pub fn extract(carrier: &dyn Extractor) -> Context {
    TraceContextPropagator::new().extract(carrier)
}

/// One `traceparent` value as a remote span context.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    struct One<'a>(&'a str);
    impl Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == TRACEPARENT).then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT]
        }
    }
    let cx = extract(&One(value));
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// `cx` as a `traceparent` value, if it holds a valid span context.
pub fn traceparent_of(cx: &Context) -> Option<String> {
    struct Out(Option<String>);
    impl Injector for Out {
        fn set(&mut self, key: &str, value: String) {
            if key == TRACEPARENT {
                self.0 = Some(value);
            }
        }
    }
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = Out(None);
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.0
}

/// Makes `span`, just created and not yet entered, a child of the trace
/// `remote` (a request's context), and records its trace id. Returns the
/// `traceparent` of the work the span covers: the span's own when spans
/// are exported, else the remote one passed through, else none.
pub fn continue_remote(span: &Span, remote: &Context) -> Option<String> {
    if span.is_none() {
        return traceparent_of(remote);
    }
    if remote.span().span_context().is_valid() {
        let _ = span.set_parent(remote.clone());
    }
    let own = span.context();
    let current = if own.span().span_context().is_valid() {
        &own
    } else {
        remote
    };
    record_trace_id(span, current);
    traceparent_of(current)
}

/// Makes `span`, just created and not yet entered, part of the trace of
/// the first of `traceparents` (an event's command) and links it to the
/// others: a projector batch applies events of many commands.
pub fn follow<'a>(span: &Span, traceparents: impl IntoIterator<Item = &'a str>) {
    if span.is_none() {
        return;
    }
    let mut contexts = traceparents.into_iter().filter_map(parse_traceparent);
    let parent = contexts.next();
    if let Some(parent) = &parent {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
    }
    for linked in contexts.take(MAX_LINKS) {
        span.add_link(linked);
    }
    let own = span.context();
    let fallback = parent
        .map(|p| Context::new().with_remote_span_context(p))
        .unwrap_or_default();
    record_trace_id(
        span,
        if own.span().span_context().is_valid() {
            &own
        } else {
            &fallback
        },
    );
}

fn record_trace_id(span: &Span, cx: &Context) {
    let context = cx.span().span_context().clone();
    if context.is_valid() {
        span.record("trace_id", display(context.trace_id()));
    }
}

pub use opentelemetry::propagation::Extractor as Carrier;
