use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = eventplane_operator::run::Args::parse();
    let _telemetry = eventplane_telemetry::init(args.log_json);
    eventplane_operator::run::run(args).await
}
