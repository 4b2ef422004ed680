//! Host names as linkgate compares them, and the authority of a request.
//!
//! Everything that names a branded host (the config file, TLS SNI, the Host
//! header, an HTTP/2 `:authority`, an absolute-form request target) goes
//! through [`HostName::parse`], so the comparison is the same everywhere:
//! ASCII case-insensitive, one trailing dot ignored, port ignored.

use std::fmt;

/// A normalised DNS host name: lower case, no trailing dot, no port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    /// Parses a bare host name (no port). Rejects anything that is not a
    /// syntactically valid DNS name, including IP literals.
    pub fn parse(name: &str) -> Result<Self, InvalidHost> {
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        if trimmed.is_empty() || trimmed.len() > 253 || trimmed.parse::<std::net::IpAddr>().is_ok() {
            return Err(InvalidHost);
        }
        let valid_labels = trimmed.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
        if !valid_labels {
            return Err(InvalidHost);
        }
        Ok(Self(trimmed.to_ascii_lowercase()))
    }

    /// Parses the host of an authority (`host`, `host:port`, `[v6]:port`),
    /// ignoring the port. User information (`user@host`) is refused: no
    /// browser sends it and it only serves to confuse parsers.
    pub fn from_authority(authority: &str) -> Result<Self, InvalidHost> {
        if authority.contains('@') || authority.starts_with('[') {
            return Err(InvalidHost);
        }
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            Some(_) => return Err(InvalidHost),
            None => authority,
        };
        Self::parse(host)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The input was not a usable host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidHost;

impl fmt::Display for InvalidHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a valid DNS host name")
    }
}

impl std::error::Error for InvalidHost {}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> String {
        HostName::parse(s).map(|h| h.0).unwrap_or_else(|_| "<invalid>".into())
    }

    #[test]
    fn normalises_case_and_trailing_dot() {
        assert_eq!(h("URL1234.Example.COM."), "url1234.example.com");
        assert_eq!(h("click.example.test"), "click.example.test");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            ".",
            "a..b",
            "-a.com",
            "a-.com",
            "a b.com",
            "a/b",
            "127.0.0.1",
            "*.example.com",
            "a.com..",
        ] {
            assert_eq!(h(bad), "<invalid>", "{bad:?}");
        }
    }

    #[test]
    fn authority_ignores_port_only() {
        let a = |s| HostName::from_authority(s).map(|h| h.0).ok();
        assert_eq!(a("Click.Example.Test:8443").as_deref(), Some("click.example.test"));
        assert_eq!(a("click.example.test").as_deref(), Some("click.example.test"));
        assert_eq!(a("click.example.test:"), Some("click.example.test".into()));
        assert_eq!(a("user@click.example.test"), None);
        assert_eq!(a("click.example.test:x"), None);
        assert_eq!(a("[::1]:443"), None);
        assert_eq!(a("a.test:1:2"), None);
    }
}
