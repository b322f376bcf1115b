//! The `sfmirror` binary: parse the command line, start logging, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = sfmirror::cli::Cli::parse();
    sfmirror::telemetry::init_logging_as(cli.log_format);
    match sfmirror::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sfmirror: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
