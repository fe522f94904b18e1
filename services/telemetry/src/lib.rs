//! Logging and tracing set-up shared by the runtime and the operator:
//! `tracing` with an env filter (`RUST_LOG`), as text or JSON lines, and
//! OpenTelemetry traces over OTLP when the standard `OTEL_*` variables ask
//! for them.

use std::sync::OnceLock;

use tracing::Level;
use tracing_subscriber::filter::{DynFilterFn, Targets};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub mod metrics;
pub mod trace;

/// `--version` of both binaries: the release and the git revision it was
/// built from, e.g. `0.1.0 (3be797c1a2b4)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("EVENTPLANE_GIT_REVISION"),
    ")"
);

/// Keeps the trace exporter; dropping it (at the end of `main`) sends the
/// spans still buffered.
#[must_use = "spans still buffered are sent when this is dropped"]
pub struct Telemetry {
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.traces.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("trace exporter did not shut down cleanly: {err}");
        }
    }
}

/// Logs to stderr, and traces through OTLP when [`trace::exporter_from_env`]
/// finds one configured. Must run inside the Tokio runtime (the gRPC
/// exporter uses it). A second call (tests that start several stacks) does
/// nothing.
pub fn init(json: bool) -> Telemetry {
    let provider = match trace::exporter_from_env() {
        Ok(exporter) => exporter.map(trace::provider),
        Err(err) => {
            eprintln!("traces are off: {err}");
            None
        }
    };
    init_with(json, provider)
}

/// Installs the log layer and, given a pipeline, the span layer.
fn init_with(
    json: bool,
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
) -> Telemetry {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.set(()).is_err() {
        return Telemetry { traces: None };
    }
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    // Logs go to stderr so that command output (`--json`) stays clean.
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        logs.json().boxed()
    } else {
        logs.boxed()
    };
    // `RUST_LOG` picks log lines only: the spans a trace is made of are
    // exported whatever the log level.
    let spans = provider.as_ref().map(|provider| {
        trace::layer(provider).with_filter(Targets::new().with_target("eventplane", Level::INFO))
    });
    trace::install_propagator();
    // Asked per event, not cached per callsite: with `EnvFilter`'s
    // callsite answers in this filter, the span layer stopped seeing the
    // spans only it enables (the trace test catches that).
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(DynFilterFn::new(move |meta, cx| {
            is_eventplane_span(meta) || Filter::<Registry>::enabled(&filter, meta, cx)
        })))
        .with(spans)
        .try_init();
    Telemetry { traces: provider }
}

/// Eventplane's own spans, whatever `RUST_LOG` says of their level: the
/// log lines inside a traced request then carry its span's `trace_id`.
/// They are only made for traced work, so they cost nothing otherwise.
fn is_eventplane_span(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.target().starts_with("eventplane") && *meta.level() <= Level::INFO
}
