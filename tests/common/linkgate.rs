//! linkgate under test, in this process on loopback ports, and what leads
//! up to it: the configuration text and [`Setup`], the builder for the
//! usual fixture chain (temp dir, PKI, leaves, stand-in, config, start).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Leaf, Pki, StandIn, HANG_GUARD};

/// linkgate running in this process on loopback ports.
pub struct Linkgate {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The HTTP/3 (UDP) socket, when `listen.http3` is set.
    pub http3: Option<SocketAddr>,
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
        let http3 = listeners.http3_addr().map(|a| a.expect("http3 addr"));
        let live = linkgate::reload::Live::new(config, linkgate::metrics::Metrics::new()).expect("live");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(linkgate::server::run(live.clone(), listeners, async {
            let _ = stopped.await;
        }));
        Self {
            https,
            http,
            admin,
            http3,
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
    let Served { dir, pki, up, lg, .. } = Setup::new().host(CLICK).extra(extra).start().await;
    (dir, pki, up, lg)
}

/// The usual fixture chain, written once: a temp dir, a fresh test PKI,
/// leaves for the hosts, a stand-in upstream, the config text, and linkgate
/// started in-process ([`Setup::start`]) or only the config written, for a
/// child process ([`Setup::write`]).
///
/// The config is, in this order: the `[listen]` section, `[admin]` if asked
/// for, the `[upstream]` section, one `[[host]]` per host, then the extras
/// in the order given.
pub struct Setup {
    listen: String,
    admin: Option<String>,
    upstream: Upstream,
    standin: Option<StandIn>,
    pki: Option<Pki>,
    files: Vec<(String, Vec<u8>)>,
    certs: Vec<Cert>,
    hosts: Vec<String>,
    extra: String,
    watching: bool,
}

/// A leaf to write: its stem, its names, and a validity when not the default.
struct Cert {
    stem: String,
    names: Vec<String>,
    valid: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
}

enum Upstream {
    /// [`plain_upstream`] with this response timeout.
    Plain(&'static str),
    /// The whole `[upstream]` section, given the stand-in.
    Section(Box<dyn Fn(&StandIn) -> String>),
    /// No `[upstream]` section (each host names its own).
    None,
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

impl Setup {
    /// No hosts yet, [`listen_section`], a plain stand-in behind [`plain_upstream`].
    pub fn new() -> Self {
        Self {
            listen: listen_section().to_owned(),
            admin: None,
            upstream: Upstream::Plain("2s"),
            standin: None,
            pki: None,
            files: Vec::new(),
            certs: Vec::new(),
            hosts: Vec::new(),
            extra: String::new(),
            watching: false,
        }
    }

    /// Serves `name` with a leaf of its own for exactly that name, written as
    /// `<stem>.pem`/`<stem>.key` where the stem is the name's first label
    /// (`click` for [`CLICK`]).
    pub fn host(self, name: &str) -> Self {
        let stem = stem_of(name);
        self.cert(&stem, &[name]).host_on(name, &stem)
    }

    /// Writes a leaf for `names` as `<stem>.pem`/`<stem>.key` (kept in [`Served::leaves`]).
    pub fn cert(mut self, stem: &str, names: &[&str]) -> Self {
        self.certs.push(Cert {
            stem: stem.to_owned(),
            names: names.iter().map(|n| n.to_string()).collect(),
            valid: None,
        });
        self
    }

    /// Like [`Setup::cert`], the leaf made by [`Pki::leaf_valid`].
    pub fn cert_valid(
        mut self,
        stem: &str,
        names: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Self {
        self.certs.push(Cert {
            stem: stem.to_owned(),
            names: names.iter().map(|n| n.to_string()).collect(),
            valid: Some((not_before, not_after)),
        });
        self
    }

    /// Serves `name` with the certificate files `<stem>.pem`/`<stem>.key`
    /// (from [`Setup::cert`], or written by the test).
    pub fn host_on(self, name: &str, stem: &str) -> Self {
        self.host_section(&host_section(name, stem))
    }

    /// Like [`Setup::host`], with `keys` (TOML lines) added to its `[[host]]` section.
    pub fn host_with(self, name: &str, keys: &str) -> Self {
        let stem = stem_of(name);
        self.cert(&stem, &[name])
            .host_section(&format!("{}{keys}", host_section(name, &stem)))
    }

    /// A `[[host]]` section written out by the test.
    pub fn host_section(mut self, section: &str) -> Self {
        self.hosts.push(section.to_owned());
        self
    }

    /// Replaces the `[listen]` section.
    pub fn listen(mut self, section: &str) -> Self {
        self.listen = section.to_owned();
        self
    }

    /// An `[admin]` listener on loopback port 0.
    pub fn admin(self) -> Self {
        self.admin_listen("127.0.0.1:0")
    }

    /// An `[admin]` listener on `addr`.
    pub fn admin_listen(mut self, addr: impl std::fmt::Display) -> Self {
        self.admin = Some(format!("[admin]\nlisten = \"{addr}\"\n"));
        self
    }

    /// [`plain_upstream`] with another `response_timeout`.
    pub fn response_timeout(mut self, timeout: &'static str) -> Self {
        self.upstream = Upstream::Plain(timeout);
        self
    }

    /// The whole `[upstream]` section, made from the stand-in.
    pub fn upstream(mut self, section: impl Fn(&StandIn) -> String + 'static) -> Self {
        self.upstream = Upstream::Section(Box::new(section));
        self
    }

    /// No `[upstream]` section: each host names its upstream (a provider preset).
    pub fn no_upstream(mut self) -> Self {
        self.upstream = Upstream::None;
        self
    }

    /// This PKI instead of a fresh one (when a stand-in must be made from it first).
    pub fn pki(mut self, pki: Pki) -> Self {
        self.pki = Some(pki);
        self
    }

    /// Writes `contents` to `<dir>/<path>` (making its folders) before linkgate starts.
    pub fn file(mut self, path: &str, contents: impl AsRef<[u8]>) -> Self {
        self.files.push((path.to_owned(), contents.as_ref().to_vec()));
        self
    }

    /// This stand-in instead of a fresh [`StandIn::plain`].
    pub fn standin(mut self, up: StandIn) -> Self {
        self.standin = Some(up);
        self
    }

    /// `toml` appended to the config.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// A `[limits]` section with `keys` appended to the config.
    pub fn limits(self, keys: &str) -> Self {
        self.extra(&format!("[limits]\n{keys}"))
    }

    /// Starts linkgate with the file watcher running ([`Linkgate::start_watching`]).
    pub fn watching(mut self) -> Self {
        self.watching = true;
        self
    }

    /// The config text for the stand-in `up` (certificates are not written).
    pub fn text(&self, up: &StandIn) -> String {
        let upstream = match &self.upstream {
            Upstream::Plain(timeout) => plain_upstream_timeout(up, timeout),
            Upstream::Section(section) => section(up),
            Upstream::None => String::new(),
        };
        format!(
            "{}{}{upstream}{}{}",
            self.listen,
            self.admin.as_deref().unwrap_or(""),
            self.hosts.concat(),
            self.extra
        )
    }

    /// Makes the temp dir, PKI, leaves and stand-in, and writes the config
    /// to `<dir>/linkgate.toml`; linkgate is not started.
    pub async fn write(mut self) -> Fixture {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let pki = self.pki.take().unwrap_or_else(Pki::new);
        for (path, contents) in &self.files {
            let path = dir.path().join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(&path, contents).expect("write file");
        }
        let leaves = self
            .certs
            .iter()
            .map(|cert| {
                let names: Vec<&str> = cert.names.iter().map(String::as_str).collect();
                let leaf = match cert.valid {
                    None => pki.write_leaf(dir.path(), &cert.stem, &names),
                    Some((not_before, not_after)) => {
                        let leaf = pki.leaf_valid(&names, not_before, not_after);
                        let stem = &cert.stem;
                        std::fs::write(dir.path().join(format!("{stem}.pem")), &leaf.cert_pem).expect("write cert");
                        std::fs::write(dir.path().join(format!("{stem}.key")), &leaf.key_pem).expect("write key");
                        leaf
                    }
                };
                (cert.stem.clone(), leaf)
            })
            .collect();
        let up = match self.standin.take() {
            Some(up) => up,
            None => StandIn::plain().await,
        };
        let toml = self.text(&up);
        let config = dir.path().join("linkgate.toml");
        std::fs::write(&config, &toml).expect("write config");
        Fixture {
            dir,
            pki,
            up,
            leaves,
            toml,
            config,
            watching: self.watching,
        }
    }

    /// [`Setup::write`], then linkgate started in-process on that config.
    pub async fn start(self) -> Served {
        self.write().await.start().await
    }
}

/// What [`Setup::write`] made: everything but linkgate.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub up: StandIn,
    /// The leaves written, by stem.
    pub leaves: std::collections::BTreeMap<String, Leaf>,
    /// The config text, as written to [`Fixture::config`].
    pub toml: String,
    /// `<dir>/linkgate.toml`.
    pub config: PathBuf,
    watching: bool,
}

impl Fixture {
    /// Writes `setup`'s config for this fixture's stand-in as `<dir>/<name>`
    /// (for more than one config in one dir; `setup`'s certificates are not written).
    pub fn write_config(&self, name: &str, setup: &Setup) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, setup.text(&self.up)).expect("write config");
        path
    }

    /// Starts linkgate in-process on the config written.
    pub async fn start(self) -> Served {
        let lg = if self.watching {
            Linkgate::start_watching(self.dir.path(), &self.toml).await
        } else {
            Linkgate::start(self.dir.path(), &self.toml).await
        };
        Served {
            dir: self.dir,
            pki: self.pki,
            up: self.up,
            lg,
            leaves: self.leaves,
            toml: self.toml,
        }
    }
}

/// What [`Setup::start`] made. Destructure it keeping `dir` bound
/// (`let Served { dir: _dir, .. }`): dropping it removes the files.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub up: StandIn,
    pub lg: Linkgate,
    /// The leaves written, by stem.
    pub leaves: std::collections::BTreeMap<String, Leaf>,
    /// The config text linkgate was started with.
    pub toml: String,
}

/// The stem [`Setup::host`] names a host's certificate files by: its first label.
pub fn stem_of(name: &str) -> String {
    name.split('.').next().unwrap_or(name).to_ascii_lowercase()
}

/// A `[listen]` section on loopback port 0, with a plain-http listener too.
pub fn listen_section() -> &'static str {
    "[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n"
}

/// An `[upstream]` section for a plain stand-in, dialled via `connect_to`
/// while the URL names sendgrid.net.
pub fn plain_upstream(up: &StandIn) -> String {
    plain_upstream_timeout(up, "2s")
}

/// [`plain_upstream`] with `response_timeout = timeout`.
pub fn plain_upstream_timeout(up: &StandIn, timeout: &str) -> String {
    format!(
        "[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{}\"\nresponse_timeout = \"{timeout}\"\n",
        up.addr
    )
}

pub fn host_section(name: &str, stem: &str) -> String {
    format!("[[host]]\nname = \"{name}\"\ncert = \"{stem}.pem\"\nkey = \"{stem}.key\"\n")
}
