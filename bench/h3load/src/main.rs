//! h3load: an HTTP/3 load generator, as h2load is for HTTP/2, for the
//! benchmark's scenario (i) (bench/README.md). It speaks HTTP/3 with the
//! crates linkgate uses (quinn, h3, h3-quinn, rustls on aws-lc-rs), on one
//! thread as the benchmark runs wrk and h2load (`-t1`):
//!
//! `h3load --ca cert.pem -c 64 -m 10 -d 6 https://localhost:8443/wf/open`
//!
//! establishes 64 connections, then keeps 10 requests in flight on each for
//! 6 s, reading every answer whole, and prints one JSON line: requests,
//! requests/s, errors by kind, p50/p99 latency and its own CPU time (see
//! `report.rs`). Layout: `args` (command line), `tls` (trust and ALPN),
//! `load` (connections and streams), `cpu` (getrusage), `report` (the line).

mod args;
mod cpu;
mod load;
mod report;
mod tls;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use args::{Command, Target};

fn main() -> ExitCode {
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("h3load {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&e, true),
    };
    let client = match tls::client(&args.ca) {
        Ok(client) => client,
        Err(e) => return fail(&e, false),
    };
    let addr = match resolve(&args.target) {
        Ok(addr) => addr,
        Err(e) => return fail(&e, false),
    };
    // One thread, as the other load generators run (-t1). Names are
    // resolved above, so the runtime needs no blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e, false),
    };
    let outcome = runtime.block_on(load::run(&args, &client, addr));
    println!("{}", report::json(&outcome));
    if outcome.connections == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(e: &dyn std::fmt::Display, usage: bool) -> ExitCode {
    eprintln!("h3load: {e}");
    if usage {
        eprintln!("{}", args::USAGE);
    }
    ExitCode::from(2)
}

/// The URL's host resolved: its first IPv4 address, else its first
/// (`localhost` is often `::1` first, and servers under test listen on 127.0.0.1).
fn resolve(target: &Target) -> std::io::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port).to_socket_addrs()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| std::io::Error::other(format!("{}: no address", target.host)))
}
