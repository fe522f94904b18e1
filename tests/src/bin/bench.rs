use clap::Parser;
use eventplane_tests::bench::{self, Args, openloop};

/// The allocator the eventplane binary runs with: the stack under test runs
/// in this process (beside the bare references, which get it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // The bench starts itself again as its open-loop load generator.
    if std::env::var_os(openloop::SPEC_ENV).is_some() {
        return openloop::worker();
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    tokio::runtime::Runtime::new()?.block_on(bench::run(args))
}
