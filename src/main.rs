//! The `linkgate` command: parses arguments, sets up logging, and hands over
//! to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use tokio::signal::unix::{signal, Signal, SignalKind};

use clap::{Parser, Subcommand};
use linkgate::config::{self, Config, LogFormat};
use linkgate::metrics::Metrics;
use linkgate::reload::{self, Live, Trigger};
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
    /// Probe every link branding from the outside, as SendGrid does: DNS (the
    /// CNAME no longer leads to the provider), HTTPS (valid certificate, the
    /// provider's probe path reaches it with the branded Host) and plain HTTP.
    /// With SENDGRID_API_KEY set (or --api-key-file), also every branding on
    /// the SendGrid account, held against the config. Exit status: 0 all
    /// pass, 1 a check failed, 2 unusable arguments.
    Doctor(Box<DoctorArgs>),
    /// Print every branding on the provider's account as [[host]] entries
    /// (TOML, ready to paste into the config), read from its API with the key
    /// in SENDGRID_API_KEY or --api-key-file. Exit status: 0 printed, 1 the
    /// account could not be read, 2 unusable arguments.
    Import(Box<ImportArgs>),
    /// Check a configuration offline, as `serve` would at start-up, plus warnings
    /// (expiry, chain, key permissions). Exit status: 0 no errors, 1 errors
    /// (or warnings with --strict), 2 unusable arguments.
    Check {
        /// The configuration file.
        #[arg(short, long, env = "LINKGATE_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Treat warnings as errors.
        #[arg(long)]
        strict: bool,
    },
    /// Ask a running linkgate, over its admin listener, whether it is alive
    /// (/healthz) or ready (/readyz, with --ready). Needs no shell or curl, for
    /// container HEALTHCHECKs. Exit status: 0 healthy, 1 not, 2 unusable
    /// arguments (no [admin] listen in the config).
    Health {
        /// The configuration file (its `[admin] listen` is probed).
        #[arg(short, long, env = "LINKGATE_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Probe /readyz (accepting traffic) instead of /healthz (alive).
        #[arg(long)]
        ready: bool,
        /// Bound on the probe.
        #[arg(long, default_value = "2s", value_parser = |s: &str| config::parse_duration(s, false))]
        timeout: std::time::Duration,
    },
    /// Run the proxy until SIGINT or SIGTERM.
    Serve {
        /// The configuration file.
        #[arg(short, long, env = "LINKGATE_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

/// Arguments of `linkgate doctor`.
#[derive(clap::Args)]
struct DoctorArgs {
    /// The configuration file.
    #[arg(short, long, env = "LINKGATE_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Probe only this host (repeatable); default: every configured host.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Name server to ask, IP:PORT; default: the system's.
    #[arg(long)]
    resolver: Option<std::net::SocketAddr>,
    /// Fail unless each host's CNAME chain leads to this name (your load balancer's).
    #[arg(long)]
    expect_target: Option<String>,
    /// Connect here for https instead of the resolved address on port 443.
    #[arg(long)]
    connect: Option<std::net::SocketAddr>,
    /// Connect here for plain http instead of the resolved address on port 80.
    #[arg(long)]
    connect_http: Option<std::net::SocketAddr>,
    /// Connect here (UDP) for HTTP/3 instead of the resolved address on the
    /// advertised port (when the config has listen.http3).
    #[arg(long)]
    connect_http3: Option<std::net::SocketAddr>,
    /// Verify certificates against these roots (PEM) instead of the public web roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Path and query to fetch from every host (use a tracked link from a real
    /// test email); default: each host's provider's own probe path (README,
    /// "Providers"), `/` for a plain `url` upstream.
    #[arg(long)]
    url: Option<String>,
    /// Bound on each probe, and on each request to the provider API (with its answer).
    #[arg(long, default_value = "10s", value_parser = |s: &str| config::parse_duration(s, false))]
    timeout: std::time::Duration,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    account: AccountArgs,
}

/// Arguments of `linkgate import`.
#[derive(clap::Args)]
struct ImportArgs {
    /// The provider whose account to list.
    #[arg(value_parser = ["sendgrid"])]
    provider: String,
    /// Bound on the connection, and on each request with its answer.
    #[arg(long, default_value = "10s", value_parser = |s: &str| config::parse_duration(s, false))]
    timeout: std::time::Duration,
    #[command(flatten)]
    account: AccountArgs,
}

/// How `doctor` and `import` read the provider's account.
#[derive(clap::Args)]
struct AccountArgs {
    /// Read the provider API key from this file (else from SENDGRID_API_KEY);
    /// never give the key itself on the command line.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Also list this subuser's brandings (its username, or "account-id ID"),
    /// with the parent's key (repeatable).
    #[arg(long, value_name = "USER")]
    on_behalf_of: Vec<String>,
    /// Also list this EU regional subuser's brandings, through the EU API
    /// (https://api.eu.sendgrid.com) (repeatable).
    #[arg(long, value_name = "USER")]
    eu_subuser: Vec<String>,
    /// Send every API request here instead of the provider's API
    /// (https://host[:port]; a test stand-in, a gateway).
    #[arg(long, value_name = "URL")]
    provider_api: Option<String>,
    /// Verify the API's certificate against these roots (PEM) instead of the public web roots.
    #[arg(long, value_name = "FILE")]
    provider_api_ca: Option<PathBuf>,
    /// Brandings asked for per API request (1 to 500).
    #[arg(long, default_value_t = 50, value_name = "N")]
    api_page_size: usize,
}

impl AccountArgs {
    fn wanted(self) -> linkgate::account::Wanted {
        linkgate::account::Wanted {
            api_key_file: self.api_key_file,
            on_behalf_of: self.on_behalf_of,
            eu_subusers: self.eu_subuser,
            api: self.provider_api,
            ca_file: self.provider_api_ca,
            page_size: self.api_page_size,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return refuse(&e),
    };
    match cli.command {
        Command::Doctor(args) => {
            let args = *args;
            let asked = linkgate::doctor::Asked {
                hosts: args.hosts,
                probe: linkgate::doctor::Settings {
                    resolver: args.resolver,
                    expect_target: args.expect_target,
                    connect: args.connect,
                    connect_http: args.connect_http,
                    connect_http3: args.connect_http3,
                    ca_file: args.ca_file,
                    url: args.url,
                    timeout: args.timeout,
                },
                json: matches!(args.format, Format::Json),
                account: args.account.wanted(),
            };
            linkgate::doctor::command(&args.config, asked)
        }
        Command::Import(args) => {
            let args = *args;
            linkgate::import::command(&args.provider, args.account.wanted(), args.timeout)
        }
        Command::Check { config, format, strict } => {
            linkgate::check::command(&config, matches!(format, Format::Json), strict)
        }
        Command::Health { config, ready, timeout } => linkgate::admin::health(&config, ready, timeout),
        Command::Serve { config } => match serve(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("linkgate: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Prints clap's refusal of the arguments and exits as clap would; an
/// argument that looks like an API key (given in the wrong place: clap
/// echoes an unexpected argument) is shown as `<api key>`.
fn refuse(e: &clap::Error) -> ExitCode {
    let keys: Vec<linkgate::account::ApiKey> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .flat_map(|a| {
            let value = a.split_once('=').map(|(_, v)| v.to_owned());
            [Some(a), value]
        })
        .flatten()
        .filter(|a| linkgate::account::looks_like_key(a))
        .map(linkgate::account::ApiKey::new)
        .collect();
    if keys.is_empty() {
        e.exit();
    }
    let text = keys.iter().fold(e.render().to_string(), |text, key| key.redact(&text));
    eprint!("{text}");
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    linkgate::access::set_text_log(matches!(format, LogFormat::Text));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    // Validate everything before binding anything.
    let config = Config::load(path)?;
    if let Some(acme) = &config.acme {
        linkgate::acme::Storage::new(&acme.storage)
            .prepare()
            .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
    }
    init_logging(config.log.format);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        // Signal handlers first: a SIGHUP or SIGTERM that arrives once the
        // listeners are up must never meet the default action (exit).
        let Signals { hup, mut term } = Signals::install();
        let listeners = Listeners::bind(&config).await?;
        let live = Live::new(config, Metrics::new())?;
        let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(reload::run(live.clone(), reload_tx.clone(), reload_rx));
        tokio::spawn(forward_sighup(hup, reload_tx));
        server::run(live, listeners, async move {
            let which = term.next().await;
            tracing::info!(signal = which, "draining; a second SIGINT or SIGTERM exits at once");
            tokio::spawn(async move {
                let which = term.next().await;
                eprintln!("linkgate: second {which}: exiting now");
                std::process::exit(1);
            });
        })
        .await
    })
}

/// The process's signal handlers, installed before anything is bound.
struct Signals {
    hup: Option<Signal>,
    term: Termination,
}

impl Signals {
    fn install() -> Self {
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for {name}");
                None
            }
        };
        Self {
            hup: listen(SignalKind::hangup(), "SIGHUP"),
            term: Termination {
                int: listen(SignalKind::interrupt(), "SIGINT"),
                term: listen(SignalKind::terminate(), "SIGTERM"),
            },
        }
    }
}

/// SIGINT and SIGTERM, each time either arrives.
struct Termination {
    int: Option<Signal>,
    term: Option<Signal>,
}

impl Termination {
    /// Completes on the next SIGINT or SIGTERM and says which.
    async fn next(&mut self) -> &'static str {
        async fn one(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.int) => "SIGINT",
            () = one(&mut self.term) => "SIGTERM",
        }
    }
}

/// Turns every SIGHUP into a reload request.
async fn forward_sighup(hup: Option<Signal>, reload: tokio::sync::mpsc::UnboundedSender<Trigger>) {
    let Some(mut hup) = hup else { return };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received");
        if reload.send(Trigger::Signal).is_err() {
            return;
        }
    }
}
