//! The `linkgate` command: parses arguments, sets up logging, and hands over
//! to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use linkgate::config::{self, Config};
use linkgate::server::{self, Listeners};

/// TLS-terminating proxy for email link-branding (click and open tracking) hosts.
///
/// linkgate presents each branded host's certificate, selected by SNI, and
/// forwards every request to the email provider (default https://sendgrid.net)
/// with the Host header set to the branded name. See README.md.
#[derive(Parser)]
#[command(name = "linkgate", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGINT or SIGTERM.
    Serve {
        /// The configuration file.
        #[arg(short, long, env = "LINKGATE_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match cli.command {
        Command::Serve { config } => match serve(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("linkgate: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    // Validate everything before binding anything.
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listeners = Listeners::bind(&config.listen).await?;
        server::run(config, listeners, shutdown_signal()).await
    })
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
