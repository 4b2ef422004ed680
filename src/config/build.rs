//! Building the validated sections from the file as written: each value
//! checked, every refusal naming its key.

use super::*;

pub(super) fn build_acme(raw: RawAcme, base: &Path, listen: &Listen) -> Result<Acme, KeyError> {
    let directory = raw.directory.ok_or((
        "acme.directory",
        "missing: the ACME server's directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory".into(),
    ))?;
    let uri: http::Uri = directory
        .parse()
        .map_err(|e| ("acme.directory", format!("{directory:?}: {e}")))?;
    if uri.scheme_str() != Some("https") || uri.authority().is_none() {
        return Err(("acme.directory", format!("{directory:?}: must be an https:// URL")));
    }
    let contact = match raw.email {
        Some(email) => {
            let valid = email.split_once('@').is_some_and(|(user, domain)| {
                !user.is_empty() && domain.contains('.') && !email.contains(|c: char| c.is_whitespace() || c == ',')
            });
            if !valid {
                return Err(("acme.email", format!("{email:?} is not an email address")));
            }
            Some(format!("mailto:{email}"))
        }
        None => None,
    };
    let storage = base.join(raw.storage.ok_or((
        "acme.storage",
        "missing: a folder for the account key, certificates and locks (shared by every replica), e.g. /var/lib/linkgate/acme".into(),
    ))?);
    let challenge = match raw.challenge.as_deref() {
        None | Some("tls-alpn-01") => Challenge::TlsAlpn01,
        Some("http-01") => Challenge::Http01,
        Some(other) => {
            return Err((
                "acme.challenge",
                format!("{other:?} is neither \"tls-alpn-01\" nor \"http-01\""),
            ))
        }
    };
    if challenge == Challenge::Http01 && listen.http.is_none() {
        return Err((
            "acme.challenge",
            "http-01 is answered on the plain-http listener: set listen.http (port 80 as the CA sees it)".into(),
        ));
    }
    let renew_before = duration("acme.renew_before", raw.renew_before, Duration::from_secs(30 * 86400))?;
    let ca_certs = raw
        .ca_file
        .map(|file| tls::load_certs(&base.join(file)))
        .transpose()
        .map_err(|m| ("acme.ca_file", m))?;
    let eab = match (raw.eab_kid, raw.eab_hmac_key) {
        (None, None) => None,
        (Some(kid), Some(key)) => {
            use base64::Engine as _;
            let trimmed = key.trim().trim_end_matches('=');
            let hmac_key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(trimmed)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
                .map_err(|_| {
                    (
                        "acme.eab_hmac_key",
                        "not base64 (give the key exactly as the CA shows it)".into(),
                    )
                })?;
            if kid.trim().is_empty() || hmac_key.is_empty() {
                return Err(("acme.eab_kid", "the key id and the HMAC key must not be empty".into()));
            }
            Some(Eab { kid, hmac_key })
        }
        (Some(_), None) => return Err(("acme.eab_hmac_key", "missing: eab_kid needs its eab_hmac_key".into())),
        (None, Some(_)) => return Err(("acme.eab_kid", "missing: eab_hmac_key needs its eab_kid".into())),
    };
    Ok(Acme {
        directory,
        contact,
        storage,
        challenge,
        renew_before,
        ca_certs,
        eab,
    })
}

/// The provider preset `raw` names: its `provider`, else sendgrid unless a bare `url` is given.
pub fn preset_of(raw: &RawUpstream) -> Result<Option<&'static Preset>, KeyError> {
    match (&raw.provider, &raw.url) {
        (Some(name), _) => provider::find(name).map(Some).map_err(|m| ("upstream.provider", m)),
        (None, None) => Ok(provider::find(provider::DEFAULT).ok()),
        (None, Some(_)) => Ok(None),
    }
}

pub(super) fn build_upstream(raw: RawUpstream, base: &Path) -> Result<Upstream, KeyError> {
    let preset = preset_of(&raw)?;
    let url = match (&raw.url, preset) {
        (Some(url), _) => {
            if raw.region.is_some() {
                return Err((
                    "upstream.region",
                    "applies to a provider preset; url already names the endpoint".into(),
                ));
            }
            url.clone()
        }
        (None, Some(p)) => p.url(raw.region.as_deref()).map_err(|m| ("upstream.region", m))?,
        (None, None) => unreachable!("preset_of gives a preset when there is no url"),
    };
    let url = url.as_str();
    let uri: http::Uri = url.parse().map_err(|e| ("upstream.url", format!("{url:?}: {e}")))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(("upstream.url", format!("{url:?}: must start with http:// or https://"))),
    };
    if let Some(p) = preset.filter(|p| p.http_only && scheme == Scheme::HTTPS) {
        return Err((
            "upstream.url",
            format!(
                "{url:?}: {} does not accept HTTPS from a proxy; use http:// (linkgate still serves https to clients)",
                p.name
            ),
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or(("upstream.url", format!("{url:?}: no host")))?;
    if authority.as_str().contains('@') {
        return Err(("upstream.url", format!("{url:?}: user information is not allowed")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err((
            "upstream.url",
            format!("{url:?}: give only scheme, host and port: the request path is forwarded as it came"),
        ));
    }
    let connect_to = raw
        .connect_to
        .as_deref()
        .map(parse_addr)
        .transpose()
        .map_err(|m| ("upstream.connect_to", m))?;
    let ca_certs = match raw.ca_file {
        Some(file) => {
            let file = base.join(file);
            if scheme == Scheme::HTTP {
                return Err(("upstream.ca_file", "only applies to an https upstream url".into()));
            }
            Some(tls::load_certs(&file).map_err(|m| ("upstream.ca_file", m))?)
        }
        None => None,
    };
    Ok(Upstream {
        scheme,
        authority,
        connect_to,
        ca_certs,
        connect_timeout: duration("upstream.connect_timeout", raw.connect_timeout, Duration::from_secs(5))?,
        response_timeout: duration(
            "upstream.response_timeout",
            raw.response_timeout,
            Duration::from_secs(30),
        )?,
        pool_idle_timeout: duration(
            "upstream.pool_idle_timeout",
            raw.pool_idle_timeout,
            Duration::from_secs(90),
        )?,
        provider: preset,
        max_header_bytes: preset.and_then(|p| p.max_header_bytes),
    })
}

type KeyError = (&'static str, String);

pub(super) fn duration(key: &'static str, value: Option<String>, default: Duration) -> Result<Duration, KeyError> {
    value.map_or(Ok(default), |v| parse_duration(&v, false).map_err(|m| (key, m)))
}

pub(super) fn size(key: &'static str, value: Option<SizeValue>, default: u64) -> Result<u64, KeyError> {
    match value {
        None => Ok(default),
        Some(SizeValue::Bytes(n)) => Ok(n),
        Some(SizeValue::Text(t)) => parse_size(&t).map_err(|m| (key, m)),
    }
}

pub(super) fn build_limits(raw: RawLimits) -> Result<Limits, KeyError> {
    let d = Limits::default();
    let max_header_bytes = size(
        "limits.max_header_bytes",
        raw.max_header_bytes,
        d.max_header_bytes as u64,
    )?;
    if !(1024..=1 << 20).contains(&max_header_bytes) {
        return Err(("limits.max_header_bytes", "must be between 1KiB and 1MiB".into()));
    }
    let max_connections = raw.max_connections.unwrap_or(d.max_connections);
    if max_connections == 0 {
        return Err(("limits.max_connections", "must be at least 1".into()));
    }
    // By default a quarter of the connections may be handshaking, and one
    // address may hold a quarter of those, 256 at most (a handshake lasts
    // about a round trip: 256 at once is over a thousand new connections a
    // second from one address, for CGNAT and link scanners).
    let max_handshakes = raw.max_handshakes.unwrap_or((max_connections / 4).max(1));
    if !(1..=max_connections).contains(&max_handshakes) {
        return Err((
            "limits.max_handshakes",
            format!("must be between 1 and limits.max_connections ({max_connections})"),
        ));
    }
    let connections_per_address = raw.connections_per_address.unwrap_or((max_connections / 4).max(1));
    if !(1..=max_connections).contains(&connections_per_address) {
        return Err((
            "limits.connections_per_address",
            format!("must be between 1 and limits.max_connections ({max_connections})"),
        ));
    }
    let handshakes_per_address = raw
        .handshakes_per_address
        .unwrap_or((max_handshakes / 4).clamp(1, d.handshakes_per_address));
    if !(1..=max_handshakes).contains(&handshakes_per_address) {
        return Err((
            "limits.handshakes_per_address",
            format!("must be between 1 and limits.max_handshakes ({max_handshakes})"),
        ));
    }
    let upstream_per_connection = raw.upstream_per_connection.unwrap_or(d.upstream_per_connection);
    if !(1..=1024).contains(&upstream_per_connection) {
        return Err(("limits.upstream_per_connection", "must be between 1 and 1024".into()));
    }
    let max_upstream_connections = raw.max_upstream_connections;
    if max_upstream_connections == Some(0) {
        return Err(("limits.max_upstream_connections", "must be at least 1".into()));
    }
    Ok(Limits {
        handshake_timeout: duration("limits.handshake_timeout", raw.handshake_timeout, d.handshake_timeout)?,
        header_read_timeout: duration(
            "limits.header_read_timeout",
            raw.header_read_timeout,
            d.header_read_timeout,
        )?,
        idle_timeout: duration("limits.idle_timeout", raw.idle_timeout, d.idle_timeout)?,
        max_connections,
        max_handshakes,
        handshakes_per_address,
        connections_per_address,
        max_header_bytes: max_header_bytes as usize,
        max_request_body: size("limits.max_request_body", raw.max_request_body, d.max_request_body)?,
        upstream_per_connection,
        max_upstream_connections,
    })
}

pub(super) fn build_shutdown(raw: RawShutdown) -> Result<Shutdown, KeyError> {
    let d = Shutdown::default();
    Ok(Shutdown {
        drain_delay: raw.drain_delay.map_or(Ok(d.drain_delay), |v| {
            parse_duration(&v, true).map_err(|m| ("shutdown.drain_delay", m))
        })?,
        grace_period: duration("shutdown.grace_period", raw.grace_period, d.grace_period)?,
    })
}

pub(super) fn build_log(raw: RawLog) -> Result<Log, KeyError> {
    let d = Log::default();
    let format = match raw.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => return Err(("log.format", format!("{other:?}: use \"text\" or \"json\""))),
    };
    Ok(Log {
        format,
        access: raw.access.unwrap_or(d.access),
        query: raw.query.unwrap_or(d.query),
    })
}

pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address: write IP:PORT, e.g. \"0.0.0.0:443\" or \"[::]:443\""))
}

pub(super) fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let mut message = e.message().trim().replace('\n', " ");
        if let Some(span) = e.span().filter(|_| message.starts_with("unknown field")) {
            // A commented option uncommented below the wrong table header
            // lands in that table: say which one it landed in.
            if let Some(table) = table_at(text, span.start) {
                message = format!("in {table}: {message}");
            }
            if let Some(key) = TOP_LEVEL_KEYS
                .iter()
                .find(|k| message.contains(&format!("unknown field `{k}`")))
            {
                message = format!("{message}; `{key}` is a top-level key: put it above the first [table]");
            }
        } else if let Some(span) = e.span().filter(|_| message.starts_with("invalid type")) {
            // toml names the type, not the key: name the key from its line.
            let line = text
                .get(span.start..)
                .and_then(|_| text[..span.start].rsplit('\n').next());
            if let Some(key) = line
                .and_then(|l| l.split('=').next())
                .map(str::trim)
                .filter(|k| !k.is_empty())
            {
                let duration = ["_timeout", "_delay", "_period", "_before"]
                    .iter()
                    .any(|s| key.ends_with(s));
                message = if duration && message.contains("expected a string") {
                    format!("{key}: {message}: a duration is a string with its unit, e.g. \"15s\", \"500ms\", \"2m\"")
                } else {
                    format!("{key}: {message}")
                };
            }
        }
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map(|span| line_of(text, span.start)),
            message,
        }
    })
}

/// Keys of the file's top level, which land in a table when written below one.
const TOP_LEVEL_KEYS: [&str; 2] = ["certs_dir", "error_page"];

/// The table a byte offset of `text` falls in, as a person would name it:
/// `[listen]`, or `[[host]] #3 (url1234.example.com)` for the third host.
fn table_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let mut current = None;
    let mut arrays: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut start = 0;
    for line in before.lines() {
        let header = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
            let name = name.trim();
            let n = arrays.entry(name).or_insert(0);
            *n += 1;
            current = Some((format!("[[{name}]] #{n}"), start));
        } else if let Some(name) = header.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            current = Some((format!("[{}]", name.trim()), start));
        }
        start += line.len() + 1;
    }
    let (table, at) = current?;
    if !table.starts_with("[[") {
        return Some(table);
    }
    // An array entry is easier to find by its name, when it has one.
    let name = text[at..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "name").then(|| value.trim().trim_matches('"').to_string())
        });
    Some(match name {
        Some(name) => format!("{table} ({name})"),
        None => table,
    })
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}
