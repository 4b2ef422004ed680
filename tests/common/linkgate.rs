//! linkgate started in this process on loopback ports, and the
//! configuration text that tests give it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Pki, StandIn, HANG_GUARD};

/// linkgate running in this process on loopback ports.
pub struct Linkgate {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub live: Arc<linkgate::reload::Live>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    reloader: Option<tokio::task::JoinHandle<()>>,
}

impl Linkgate {
    /// Writes `toml` to `<dir>/linkgate.toml`, loads it and serves it.
    pub async fn start(dir: &Path, toml: &str) -> Self {
        let path = dir.join("linkgate.toml");
        std::fs::write(&path, toml).expect("write config");
        let config = linkgate::config::Config::load(&path).unwrap_or_else(|e| panic!("config refused: {e}"));
        let listeners = linkgate::server::Listeners::bind(&config).await.expect("bind");
        let https = listeners.https_addr().expect("https addr");
        let http = listeners.http_addr().map(|a| a.expect("http addr"));
        let admin = listeners.admin_addr().map(|a| a.expect("admin addr"));
        let live = linkgate::reload::Live::new(config, linkgate::metrics::Metrics::new()).expect("live");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(linkgate::server::run(live.clone(), listeners, async {
            let _ = stopped.await;
        }));
        Self {
            https,
            http,
            admin,
            live,
            stop: Some(stop),
            task: Some(task),
            reloader: None,
        }
    }

    /// Like [`Linkgate::start`], with the file watcher running (reloads on file changes).
    pub async fn start_watching(dir: &Path, toml: &str) -> Self {
        let mut lg = Self::start(dir, toml).await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        lg.reloader = Some(tokio::spawn(linkgate::reload::run(lg.live.clone(), tx, rx)));
        lg
    }

    /// `https://<host>:<port><path>` for a client that resolves `host` to us.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https.port())
    }

    pub fn http_url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.http.expect("http listener").port())
    }

    /// `http://<admin address><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("admin listener"))
    }

    /// Stops the server and waits for it to finish draining.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(HANG_GUARD, task)
                .await
                .expect("server stops")
                .expect("server task")
                .expect("server result");
        }
    }
}

impl Drop for Linkgate {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(r) = self.reloader.take() {
            r.abort();
        }
    }
}

/// The branded host most tests use.
pub const CLICK: &str = "click.example.test";

/// linkgate serving [`CLICK`] (its certificate from a fresh test PKI) in
/// front of a plain stand-in upstream, with `extra` appended to the config.
pub async fn serve_click(extra: &str) -> (tempfile::TempDir, Pki, StandIn, Linkgate) {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let pki = Pki::new();
    pki.write_leaf(dir.path(), "click", &[CLICK]);
    let up = StandIn::plain().await;
    let toml = format!(
        "{}{}{}{extra}",
        listen_section(),
        plain_upstream(&up),
        host_section(CLICK, "click")
    );
    let lg = Linkgate::start(dir.path(), &toml).await;
    (dir, pki, up, lg)
}

/// A `[listen]` section on loopback port 0, with a plain-http listener too.
pub fn listen_section() -> &'static str {
    "[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n"
}

/// An `[upstream]` section for a plain stand-in, dialled via `connect_to`
/// while the URL names sendgrid.net.
pub fn plain_upstream(up: &StandIn) -> String {
    format!(
        "[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{}\"\nresponse_timeout = \"2s\"\n",
        up.addr
    )
}

pub fn host_section(name: &str, stem: &str) -> String {
    format!("[[host]]\nname = \"{name}\"\ncert = \"{stem}.pem\"\nkey = \"{stem}.key\"\n")
}
