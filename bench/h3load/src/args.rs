//! h3load's command line, parsed by hand (the workspace has clap, but a
//! load generator's five flags do not need it):
//! `h3load --ca FILE [-c CONNECTIONS] [-m STREAMS] [-d SECONDS] https://HOST[:PORT]/PATH`.
//! Short flags take their value joined or separate (`-c64`, `-c 64`), as
//! h2load's and wrk's do.

use std::path::PathBuf;
use std::time::Duration;

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Run(Args),
    Help,
    Version,
}

/// A load run, checked.
#[derive(Debug, PartialEq)]
pub struct Args {
    /// PEM certificates trusted as roots for the server's certificate.
    pub ca: PathBuf,
    /// QUIC connections, each established before the measurement starts.
    pub connections: usize,
    /// Requests kept in flight on each connection, one per stream.
    pub streams: usize,
    /// How long requests are counted for.
    pub duration: Duration,
    pub target: Target,
}

/// The URL every request asks for.
#[derive(Debug, PartialEq)]
pub struct Target {
    /// The URL's host: the SNI, the `:authority`'s host and the name resolved.
    pub host: String,
    pub port: u16,
    /// The whole URL, as each request's target.
    pub uri: http::Uri,
}

/// Why a command line is refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ArgsError {
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{flag}: {value:?} is not {wanted}")]
    Invalid {
        flag: String,
        value: String,
        wanted: &'static str,
    },
    #[error("unknown option {0}")]
    UnknownFlag(String),
    #[error("one URL expected, got a second: {0}")]
    SecondUrl(String),
    #[error("no URL given")]
    NoUrl,
    #[error("--ca is required (the PEM file of the certificate to trust)")]
    NoCa,
    #[error("URL {0:?}: {1}")]
    BadUrl(String, &'static str),
}

pub const USAGE: &str = "\
usage: h3load --ca FILE [-c CONNECTIONS] [-m STREAMS] [-d SECONDS] https://HOST[:PORT]/PATH

HTTP/3 load: CONNECTIONS QUIC connections (default 1), all established first,
then STREAMS requests in flight on each (default 1) for SECONDS (default 10),
every answer read whole. One thread. Prints one JSON line.

  --ca FILE   PEM certificates to trust for the server's certificate (required)
  -c N        connections
  -m N        concurrent streams (requests) per connection
  -d SECONDS  measurement duration, after the connections are up
  -h, --help  this text
  --version   h3load's version";

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ArgsError> {
    let mut args = args.into_iter();
    let (mut ca, mut url) = (None, None);
    let (mut connections, mut streams, mut duration) = (1, 1, Duration::from_secs(10));
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--version" => return Ok(Command::Version),
            "--ca" => ca = Some(PathBuf::from(value(&arg, None, &mut args)?)),
            _ if arg.starts_with("--ca=") => ca = Some(PathBuf::from(&arg["--ca=".len()..])),
            _ if arg.starts_with("-c") => connections = count(&arg, "-c", &mut args)?,
            _ if arg.starts_with("-m") => streams = count(&arg, "-m", &mut args)?,
            _ if arg.starts_with("-d") => duration = seconds(&arg, &mut args)?,
            _ if arg.starts_with('-') => return Err(ArgsError::UnknownFlag(arg)),
            _ if url.is_some() => return Err(ArgsError::SecondUrl(arg)),
            _ => url = Some(arg),
        }
    }
    Ok(Command::Run(Args {
        ca: ca.ok_or(ArgsError::NoCa)?,
        connections,
        streams,
        duration,
        target: target(&url.ok_or(ArgsError::NoUrl)?)?,
    }))
}

/// The value of `arg`: joined to a short flag (`-c64`) or the next argument.
fn value(arg: &str, short: Option<&str>, rest: &mut impl Iterator<Item = String>) -> Result<String, ArgsError> {
    let joined = short.map(|flag| &arg[flag.len()..]).unwrap_or_default();
    if !joined.is_empty() {
        return Ok(joined.to_owned());
    }
    rest.next().ok_or_else(|| ArgsError::MissingValue(arg.to_owned()))
}

/// A count of at least 1 for `flag`.
fn count(arg: &str, flag: &str, rest: &mut impl Iterator<Item = String>) -> Result<usize, ArgsError> {
    let text = value(arg, Some(flag), rest)?;
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ArgsError::Invalid {
            flag: flag.to_owned(),
            value: text,
            wanted: "a whole number of at least 1",
        }),
    }
}

/// `-d`: positive seconds, fractions allowed.
fn seconds(arg: &str, rest: &mut impl Iterator<Item = String>) -> Result<Duration, ArgsError> {
    let text = value(arg, Some("-d"), rest)?;
    match text.parse::<f64>().ok().map(Duration::try_from_secs_f64) {
        Some(Ok(d)) if !d.is_zero() => Ok(d),
        _ => Err(ArgsError::Invalid {
            flag: "-d".to_owned(),
            value: text,
            wanted: "a positive number of seconds",
        }),
    }
}

/// An `https` URL with a host; port 443 unless it names one; path `/` if none.
fn target(url: &str) -> Result<Target, ArgsError> {
    let bad = |why| ArgsError::BadUrl(url.to_owned(), why);
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("HTTP/3 needs an https URL"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    // The name as SNI and for resolving: an IPv6 literal without its brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let uri = if uri.path_and_query().is_some() {
        uri
    } else {
        format!("{url}/").parse().map_err(|_| bad("not a URL"))?
    };
    Ok(Target { host, port, uri })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Result<Command, ArgsError> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    fn run(line: &str) -> Args {
        match parse_line(line) {
            Ok(Command::Run(args)) => args,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn the_benchmark_command_line_is_read_whole() {
        let args = run("--ca /tmp/cert.pem -c 64 -m 10 -d 6 https://localhost:8443/wf/open");
        assert_eq!(args.ca, PathBuf::from("/tmp/cert.pem"));
        assert_eq!((args.connections, args.streams), (64, 10));
        assert_eq!(args.duration, Duration::from_secs(6));
        assert_eq!(args.target.host, "localhost");
        assert_eq!(args.target.port, 8443);
        assert_eq!(args.target.uri, "https://localhost:8443/wf/open");
    }

    #[test]
    fn short_flags_take_joined_values_and_defaults_apply() {
        let args = run("https://example.test --ca=c.pem -c2 -d0.5");
        assert_eq!((args.connections, args.streams), (2, 1));
        assert_eq!(args.duration, Duration::from_millis(500));
        assert_eq!(args.target.port, 443);
        assert_eq!(args.target.uri.path(), "/");
        assert_eq!(args.ca, PathBuf::from("c.pem"));
    }

    #[test]
    fn an_ipv6_literal_is_named_without_brackets() {
        let args = run("--ca c.pem https://[::1]:4433/x?y=1");
        assert_eq!(args.target.host, "::1");
        assert_eq!(args.target.uri.path_and_query().map(|p| p.as_str()), Some("/x?y=1"));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        assert_eq!(parse_line("-c 64 https://h/"), Err(ArgsError::NoCa));
        assert_eq!(parse_line("--ca c.pem"), Err(ArgsError::NoUrl));
        assert_eq!(
            parse_line("--ca c.pem -c"),
            Err(ArgsError::MissingValue("-c".to_owned()))
        );
        assert!(matches!(
            parse_line("--ca c.pem -c 0 https://h/"),
            Err(ArgsError::Invalid { .. })
        ));
        assert!(matches!(
            parse_line("--ca c.pem -m x https://h/"),
            Err(ArgsError::Invalid { .. })
        ));
        assert!(matches!(
            parse_line("--ca c.pem -d -1 https://h/"),
            Err(ArgsError::Invalid { .. })
        ));
        assert!(matches!(
            parse_line("--ca c.pem -d 0 https://h/"),
            Err(ArgsError::Invalid { .. })
        ));
        assert_eq!(
            parse_line("--ca c.pem -t 2 https://h/"),
            Err(ArgsError::UnknownFlag("-t".to_owned()))
        );
        assert!(matches!(parse_line("--ca c.pem http://h/"), Err(ArgsError::BadUrl(..))));
        assert!(matches!(
            parse_line("--ca c.pem https://h/ https://i/"),
            Err(ArgsError::SecondUrl(_))
        ));
    }

    #[test]
    fn help_and_version_need_nothing_else() {
        assert_eq!(parse_line("-c 2 --help"), Ok(Command::Help));
        assert_eq!(parse_line("--version"), Ok(Command::Version));
    }
}
