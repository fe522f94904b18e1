use clap::Parser;
use eventplane::cli::{Cli, Command};

/// Every request allocates (a body, headers, a cache key); mimalloc's
/// thread-local free lists make that cheaper than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = eventplane_telemetry::init(cli.log_json);
    match cli.command {
        Command::Migrate(db) => eventplane::roles::migrate(db).await,
        Command::Command(role) => eventplane::roles::command(role).await,
        Command::Projector(role) => eventplane::roles::projector(role).await,
        Command::Query(role) => eventplane::roles::query(role).await,
        Command::Relay(role) => eventplane::roles::relay(role).await,
        Command::Dev(role) => eventplane::dev::run(role).await,
        Command::Rebuild(args) => eventplane::roles::rebuild(args).await,
        Command::Partitions(args) => eventplane::partitions::run(args).await,
        Command::Projections(args) => eventplane::projections::run(args).await,
    }
}
