//! Logging set-up shared by the runtime and the operator: `tracing` with an
//! env filter (`RUST_LOG`), as text or JSON lines.

use tracing_subscriber::EnvFilter;

pub mod metrics;

/// `--version` of both binaries: the release and the git revision it was
/// built from, e.g. `0.1.0 (3be797c1a2b4)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("EVENTPLANE_GIT_REVISION"),
    ")"
);

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    // Logs go to stderr so that command output (`--json`) stays clean.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests that start several stacks) is harmless.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
