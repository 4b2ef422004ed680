//! A configuration file read once, without loading any certificate or key,
//! for the subcommands that must work where the keys are not or must not
//! stop at the first bad host: `check` (every host's entry), `doctor`
//! (hosts, providers, ACME storage) and `health` (the admin address).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::raw::RawConfig;
use super::{parse_addr, parse_raw, preset_of, ConfigError, HostEntry};
use crate::host::HostName;
use crate::provider::Preset;

/// Each host (lower-case name) with its provider preset, if any, and that
/// preset's region.
pub type HostUpstreams = HashMap<String, (Option<&'static Preset>, Option<String>)>;

/// The file as written, parsed once.
pub struct Outline {
    path: PathBuf,
    raw: RawConfig,
}

impl Outline {
    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text` as if read from `path` (relative names are resolved
    /// against `path`'s folder).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Ok(Self {
            path: path.to_path_buf(),
            raw: parse_raw(text, path)?,
        })
    }

    fn base(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The `[[host]]` entries as written (for `check`, which reports on
    /// every host rather than stopping at the first).
    pub fn host_entries(&self) -> Vec<HostEntry> {
        let base = self.base();
        self.raw
            .hosts
            .iter()
            .map(|h| HostEntry::resolve(h.clone(), base, self.raw.certs_dir.as_deref()))
            .collect()
    }

    /// The host names as written.
    pub fn host_names(&self) -> Vec<String> {
        self.raw.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// Whether there is a plain-http listener.
    pub fn has_http(&self) -> bool {
        self.raw.listen.http.is_some()
    }

    /// The port HTTP/3 is advertised on, when there is `listen.http3`:
    /// `listen.http3_advertise_port`, else the port it is bound to.
    pub fn http3_port(&self) -> Result<Option<u16>, ConfigError> {
        let Some(addr) = self.raw.listen.http3.as_deref() else {
            return Ok(None);
        };
        let bound = parse_addr(addr).map_err(|message| ConfigError::Key {
            path: self.path.clone(),
            key: "listen.http3",
            message,
        })?;
        Ok(Some(self.raw.listen.http3_advertise_port.unwrap_or(bound.port())))
    }

    /// The `[admin] listen` address, if any.
    pub fn admin_address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.raw
            .admin
            .listen
            .as_deref()
            .map(parse_addr)
            .transpose()
            .map_err(|message| ConfigError::Key {
                path: self.path.clone(),
                key: "admin.listen",
                message,
            })
    }

    /// Each host's provider preset (lower-case name → preset), for `doctor`.
    /// A bare `url` naming a preset's endpoint (`http://sendgrid.net`) is that
    /// provider; any other bare `url` has none.
    pub fn host_providers(&self) -> Result<HashMap<String, &'static Preset>, ConfigError> {
        Ok(self
            .host_upstreams()?
            .into_iter()
            .filter_map(|(name, (preset, _))| Some((name, preset?)))
            .collect())
    }

    /// Each host (lower-case name) with its provider preset and that
    /// preset's region (the one written, the preset's first otherwise, or
    /// the one whose endpoint a bare `url` names), for `doctor`'s account
    /// audit: an EU branding forwarded to the global endpoint is wrong.
    pub fn host_upstreams(&self) -> Result<HostUpstreams, ConfigError> {
        let mut out = HashMap::new();
        for entry in self.host_entries() {
            let settings = entry.upstream_settings(&self.raw.upstream);
            let preset = preset_of(&settings).map_err(|(_, message)| ConfigError::Host {
                path: self.path.clone(),
                host: entry.name.clone(),
                message,
            })?;
            let (preset, region) = match (preset, settings.url.as_deref()) {
                (Some(p), _) => (
                    Some(p),
                    settings
                        .region
                        .clone()
                        .or_else(|| p.regions.first().map(|r| r.0.to_owned())),
                ),
                (None, Some(url)) => {
                    let p = crate::provider::by_endpoint(url);
                    (p, p.and_then(|p| p.region_of_endpoint(url)).map(str::to_owned))
                }
                (None, None) => (None, None),
            };
            out.insert(normalise(&entry.name), (preset, region));
        }
        Ok(out)
    }

    /// The `[acme] storage` folder and the `acme = true` hosts; `None` when
    /// there is no `[acme] storage`.
    pub fn acme_storage(&self) -> Option<(PathBuf, Vec<HostName>)> {
        let storage = self.raw.acme.as_ref()?.storage.as_ref()?;
        let hosts = self
            .raw
            .hosts
            .iter()
            .filter(|h| h.acme)
            .filter_map(|h| HostName::parse(&h.name).ok())
            .collect();
        Some((self.base().join(storage), hosts))
    }
}

/// A host name as DNS compares them: lower case, no final dot.
fn normalise(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}
