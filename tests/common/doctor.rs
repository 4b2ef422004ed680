//! `linkgate doctor` under test: an authoritative DNS server for
//! `example.test` (hickory-server, UDP and TCP on loopback) whose branded
//! names lead to `lb.example.test` (127.0.0.1) or still to a provider, and
//! doctor itself as a child process, with its JSON or text report. Doctor
//! runs without `SENDGRID_API_KEY` unless a test gives one, so no account
//! is audited by accident.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::rr::rdata::{A, CNAME, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

/// The variable doctor and import read SendGrid's API key from.
pub const API_KEY_ENV: &str = "SENDGRID_API_KEY";

/// What one run of the binary printed.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// `linkgate <args>` with the variables in `env` (and no `SENDGRID_API_KEY`
/// but the one given), in a blocking task so in-process servers keep running.
pub async fn linkgate(args: Vec<String>, env: Vec<(&'static str, String)>) -> Run {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
            .env_remove(API_KEY_ENV)
            .envs(env)
            .args(&args)
            .output()
            .expect("run linkgate");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("join")
}

/// An authoritative server for `example.test` on a loopback port (UDP and TCP).
pub async fn dns_server() -> SocketAddr {
    let origin = Name::from_str("example.test.").expect("name");
    let mut zone: InMemoryZoneHandler = InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let name = |s: &str| Name::from_str(s).expect("name");
    let soa = SOA::new(
        name("ns.example.test."),
        name("hostmaster.example.test."),
        1,
        3600,
        600,
        86400,
        60,
    );
    zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1);
    zone.upsert_mut(
        Record::from_rdata(name("lb.example.test."), 60, RData::A(A::new(127, 0, 0, 1))),
        1,
    );
    for host in [
        "ok",
        "expired",
        "wrongname",
        "a.b",
        "nochain",
        "wronglink",
        "down",
        "stalled",
        "sg",
        "mg",
        "ses",
        "sp",
        "it",
        "cio",
        "plain",
        "sgurl",
        "mg404",
        "mgpage",
        "sg404",
        "sgpage",
    ] {
        zone.upsert_mut(
            Record::from_rdata(
                name(&format!("{host}.example.test.")),
                60,
                RData::CNAME(CNAME(name("lb.example.test."))),
            ),
            1,
        );
    }
    zone.upsert_mut(
        Record::from_rdata(
            name("stale.example.test."),
            60,
            RData::CNAME(CNAME(name("u1234.wl.sendgrid.net."))),
        ),
        1,
    );
    zone.upsert_mut(
        Record::from_rdata(
            name("mgstale.example.test."),
            60,
            RData::CNAME(CNAME(name("email.eu.mailgun.org."))),
        ),
        1,
    );
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
    let mut server = hickory_server::Server::new(catalog);
    // UDP and TCP on the same port number.
    let (udp, tcp) = loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let port = udp.local_addr().expect("addr").port();
        if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().expect("addr");
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    tokio::spawn(async move {
        let _ = server.block_until_done().await;
    });
    addr
}

/// `linkgate doctor --format json` on `config`, asking `dns`; its exit status and report.
pub fn doctor(config: &Path, dns: SocketAddr, args: &[&str]) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
        .env_remove(API_KEY_ENV)
        .arg("doctor")
        .arg("--config")
        .arg(config)
        .args(["--resolver", &dns.to_string(), "--format", "json", "--timeout", "5s"])
        .args(args)
        .output()
        .expect("run doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// Runs doctor in a blocking task (it is a child process) so the in-process servers keep running.
pub async fn doctor_async(config: &Path, dns: SocketAddr, args: Vec<String>) -> (i32, serde_json::Value) {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        doctor(&config, dns, &args)
    })
    .await
    .expect("join")
}

/// The row of host `name` in doctor's JSON report.
pub fn host<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["name"] == name)
        .expect("host row")
}

/// `linkgate doctor` (text form) on `config`, asking `dns`, in a blocking
/// task; its exit status and what it printed.
pub async fn doctor_text(config: &Path, dns: SocketAddr, args: Vec<String>) -> (Option<i32>, String) {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_linkgate"))
            .env_remove(API_KEY_ENV)
            .arg("doctor")
            .arg("--config")
            .arg(&config)
            .args(["--resolver", &dns.to_string(), "--timeout", "5s"])
            .args(&args)
            .output()
            .expect("run doctor");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .expect("join")
}
