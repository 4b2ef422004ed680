//! `[[host]]` entries: as written (file names resolved), and validated
//! into a [`Host`] as `serve` does, certificate files loaded once however
//! many hosts share them.

use super::*;

/// One `[[host]]` entry as written, its file names resolved against the config file's folder.
#[derive(Debug, Clone)]
pub struct HostEntry {
    pub name: String,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub acme: bool,
    pub hsts: Option<String>,
    pub ocsp: Option<PathBuf>,
    /// URL path → file, resolved.
    pub files: Vec<(String, PathBuf)>,
    pub http: Option<String>,
    /// `error_page`, resolved.
    pub error_page: Option<PathBuf>,
    /// The host's own upstream settings (paths as written).
    pub upstream: RawUpstream,
    /// `certs_dir/<host>/`, when the entry gives neither cert nor key nor
    /// acme and the folder holds no pair linkgate knows: what it looked for.
    pub expected_in: Option<PathBuf>,
}

/// The pairs a host's folder in `certs_dir` may hold, in the order tried:
/// a Kubernetes TLS Secret's keys, then certbot's `live/` layout.
pub const CERTS_DIR_PAIRS: [(&str, &str); 2] = [("tls.crt", "tls.key"), ("fullchain.pem", "privkey.pem")];

impl HostEntry {
    pub(super) fn resolve(raw: raw::RawHost, base: &Path, certs_dir: Option<&Path>) -> Self {
        let mut cert = raw.cert.map(|p| base.join(p));
        let mut key = raw.key.map(|p| base.join(p));
        let mut expected_in = None;
        if let (None, None, false, Some(certs_dir)) = (&cert, &key, raw.acme, certs_dir) {
            // Named after the host as DNS compares names: lowercase, no final dot.
            let folder = base
                .join(certs_dir)
                .join(raw.name.trim().trim_end_matches('.').to_ascii_lowercase());
            match CERTS_DIR_PAIRS
                .iter()
                .find(|(c, k)| folder.join(c).exists() || folder.join(k).exists())
            {
                Some((c, k)) => {
                    cert = Some(folder.join(c));
                    key = Some(folder.join(k));
                }
                None => expected_in = Some(folder),
            }
        }
        Self {
            name: raw.name,
            cert,
            key,
            expected_in,
            acme: raw.acme,
            hsts: raw.hsts,
            ocsp: raw.ocsp.map(|p| base.join(p)),
            files: raw
                .files
                .into_iter()
                .map(|(url, file)| (url, base.join(file)))
                .collect(),
            http: raw.http,
            error_page: raw.error_page.map(|p| base.join(p)),
            upstream: RawUpstream {
                provider: raw.provider,
                region: raw.region,
                url: raw.url,
                connect_to: raw.connect_to,
                ca_file: raw.ca_file,
                ..RawUpstream::default()
            },
        }
    }

    /// This host's upstream settings: its own endpoint (`provider`/`url`, with
    /// its `region`, `connect_to` and `ca_file`) when it names one; otherwise
    /// `[upstream]`'s, with the host's `region`, `connect_to` and `ca_file`
    /// taking precedence. Timeouts always come from `[upstream]`.
    pub fn upstream_settings(&self, default: &RawUpstream) -> RawUpstream {
        let own = &self.upstream;
        let timeouts = RawUpstream {
            connect_timeout: default.connect_timeout.clone(),
            response_timeout: default.response_timeout.clone(),
            pool_idle_timeout: default.pool_idle_timeout.clone(),
            ..RawUpstream::default()
        };
        if own.provider.is_some() || own.url.is_some() {
            RawUpstream {
                provider: own.provider.clone(),
                region: own.region.clone(),
                url: own.url.clone(),
                connect_to: own.connect_to.clone(),
                ca_file: own.ca_file.clone(),
                ..timeouts
            }
        } else {
            RawUpstream {
                provider: default.provider.clone(),
                region: own.region.clone().or_else(|| default.region.clone()),
                url: default.url.clone(),
                connect_to: own.connect_to.clone().or_else(|| default.connect_to.clone()),
                ca_file: own.ca_file.clone().or_else(|| default.ca_file.clone()),
                ..timeouts
            }
        }
    }
}

/// Certificate/key(/OCSP) files already loaded, so hosts sharing them load them once.
pub type LoadedPairs = BTreeMap<(PathBuf, PathBuf, Option<PathBuf>), Arc<CertifiedKey>>;

/// For a host whose key is not its certificate's: the mismatch message,
/// plus which other configured host's certificate the key does belong to
/// (two files swapped between hosts is the usual cause).
pub fn explain_key_mismatch(message: String, entry: &HostEntry, entries: &[HostEntry]) -> String {
    let (Some(key), true) = (&entry.key, message.starts_with(tls::KEY_MISMATCH)) else {
        return message;
    };
    let Some(spki) = tls::key_spki(key) else {
        return message;
    };
    let mut others = entries
        .iter()
        .filter(|other| other.name != entry.name)
        .filter_map(|other| Some((other, other.cert.as_ref()?)))
        .peekable();
    if others.peek().is_none() {
        return message;
    }
    let owner = others.find(|(_, cert)| tls::cert_spki(cert).as_ref() == Some(&spki));
    match owner {
        Some((other, cert)) => format!(
            "{message}; it is the key of the certificate for {} ({}): were the two hosts' files swapped?",
            other.name,
            cert.display()
        ),
        None => format!("{message}; it is not the key of any other configured host's certificate either"),
    }
}

/// Validates one host entry as `serve` does: its name, its files (and its
/// own `error_page`), that the key matches the certificate and that the
/// certificate covers the name.
pub fn load_host(entry: &HostEntry, loaded: &mut LoadedPairs) -> Result<Host, String> {
    let name = HostName::parse(&entry.name).map_err(|e| e.to_string())?;
    let hsts = entry
        .hsts
        .as_deref()
        .map(parse_hsts)
        .transpose()
        .map_err(|m| format!("hsts: {m}"))?;
    let certificate = match (entry.acme, &entry.cert, &entry.key) {
        (true, None, None) if entry.ocsp.is_some() => {
            return Err("ocsp: applies to hosts with cert and key, not to acme = true".into())
        }
        (true, None, None) => CertSource::Acme,
        (true, _, _) => return Err("acme = true replaces cert and key: remove one or the other".into()),
        (false, Some(cert), Some(key)) => {
            let files = (cert.clone(), key.clone(), entry.ocsp.clone());
            let certified_key = match loaded.get(&files) {
                Some(ck) => ck.clone(),
                None => {
                    let mut ck = tls::load_certified_key(cert, key)?;
                    if let Some(path) = &entry.ocsp {
                        ck.ocsp = Some(tls::load_ocsp(path)?);
                    }
                    let ck = Arc::new(ck);
                    loaded.insert(files, ck.clone());
                    ck
                }
            };
            tls::check_covers(&certified_key, &name).map_err(|m| format!("{}: {m}", cert.display()))?;
            CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
                ocsp: entry.ocsp.clone(),
                certified_key,
            }
        }
        (false, None, None) if entry.expected_in.is_some() => {
            let folder = entry.expected_in.as_deref().unwrap_or(Path::new("."));
            return Err(format!(
                "no certificate in {}: certs_dir expects tls.crt and tls.key there (a Kubernetes TLS Secret) or fullchain.pem and privkey.pem (certbot's live/ layout); or give cert and key, or acme = true",
                folder.display()
            ));
        }
        (false, None, _) => return Err("cert: missing: give cert and key, or acme = true".into()),
        (false, Some(_), None) => return Err("key: missing: give the private key of cert".into()),
    };
    let mut files = HashMap::new();
    for (url_path, file) in &entry.files {
        files::check_url_path(url_path).map_err(|m| format!("files: {m}"))?;
        files.insert(url_path.clone(), Arc::new(StaticFile::load(file)?));
    }
    let error_page = entry
        .error_page
        .as_deref()
        .map(ErrorPage::load)
        .transpose()
        .map_err(|m| format!("error_page: {m}"))?
        .map(Arc::new);
    let http = match entry.http.as_deref() {
        None | Some("forward") => HttpMode::Forward,
        Some("redirect") => HttpMode::Redirect,
        Some(other) => return Err(format!("http: {other:?} is neither \"forward\" nor \"redirect\"")),
    };
    Ok(Host {
        name,
        certificate,
        hsts,
        upstream: 0,
        files,
        http,
        error_page,
    })
}

/// Validates a `Strict-Transport-Security` value: `max-age=<seconds>`, then
/// optionally `includeSubDomains` and `preload`, separated by `;`.
fn parse_hsts(value: &str) -> Result<HeaderValue, String> {
    let mut max_age = false;
    for directive in value.split(';').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if let Some(seconds) = lower.strip_prefix("max-age=") {
            if max_age || seconds.trim_matches('"').parse::<u64>().is_err() {
                return Err(format!("{value:?}: max-age must be given once, in seconds"));
            }
            max_age = true;
        } else if lower != "includesubdomains" && lower != "preload" {
            return Err(format!(
                "{value:?}: unknown directive {directive:?} (expected max-age=<seconds>, includeSubDomains, preload)"
            ));
        }
    }
    if !max_age {
        return Err(format!("{value:?}: max-age=<seconds> is required"));
    }
    HeaderValue::from_str(value).map_err(|_| format!("{value:?} is not a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "[listen]\nhttps = \"127.0.0.1:1\"\n[acme]\ndirectory = \"https://acme.test/dir\"\nstorage = \"acme\"\n";

    fn host(name: &str, keys: &str) -> String {
        format!("[[host]]\nname = \"{name}\"\nacme = true\n{keys}")
    }

    #[test]
    fn a_hosts_error_page_beats_the_top_level_one() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        std::fs::create_dir(dir.path().join("pages")).expect("mkdir");
        std::fs::write(dir.path().join("pages/all.html"), "<p>all</p>").expect("write");
        std::fs::write(dir.path().join("pages/b.html"), "<p>b</p>").expect("write");
        let path = dir.path().join("linkgate.toml");
        let text = format!(
            "error_page = \"pages/all.html\"\n{BASE}{}{}",
            host("a.test", ""),
            host("b.test", "error_page = \"pages/b.html\"\n")
        );
        let config = Config::from_toml(&text, &path).expect("valid");
        let page_of = |i: usize| config.hosts[i].error_page.as_ref().map(|p| p.path.clone());
        assert_eq!(
            page_of(0),
            Some(dir.path().join("pages/all.html")),
            "relative to the config file"
        );
        assert_eq!(page_of(1), Some(dir.path().join("pages/b.html")));
        assert_eq!(
            config.error_page.as_ref().map(|p| p.path.clone()),
            Some(dir.path().join("pages/all.html"))
        );

        let config = Config::from_toml(&format!("{BASE}{}", host("a.test", "")), &path).expect("valid");
        assert!(config.hosts[0].error_page.is_none(), "the built-in page");
    }

    #[test]
    fn a_bad_error_page_names_the_key_or_the_host_and_the_file() {
        let path = Path::new("/nonexistent/linkgate.toml");
        let err = |text: String| Config::from_toml(&text, path).expect_err("refused").to_string();
        let e = err(format!("error_page = \"brand.html\"\n{BASE}{}", host("a.test", "")));
        assert!(
            e.starts_with("/nonexistent/linkgate.toml: error_page: /nonexistent/brand.html: cannot read: "),
            "{e}"
        );
        let e = err(format!("{BASE}{}", host("a.test", "error_page = \"a.html\"\n")));
        assert!(
            e.starts_with(
                "/nonexistent/linkgate.toml: host \"a.test\": error_page: /nonexistent/a.html: cannot read: "
            ),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
}
