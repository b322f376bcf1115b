//! The `sfmirror` binary: parse the command line, start logging, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = sfmirror::cli::Cli::parse();
    sfmirror::telemetry::init_logging_with(cli.log_format, cli.default_log());
    match sfmirror::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = sfmirror::cli::exit_code(&e);
            if code == sfmirror::cli::EX_CONFIG {
                eprintln!(
                    "sfmirror: {e:#} (exit {code}: fix this and start again; a restart alone cannot)"
                );
            } else {
                eprintln!("sfmirror: {e:#}");
            }
            std::process::ExitCode::from(code)
        }
    }
}
