//! Files a host serves itself instead of forwarding: the iOS and Android
//! app-association files (universal links / app links). Loaded and checked
//! as JSON with the configuration, answered from memory with ETag and
//! Last-Modified validators.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::response::Local;

/// One file, as served.
#[derive(Debug, Clone)]
pub struct StaticFile {
    pub path: PathBuf,
    body: Bytes,
    etag: HeaderValue,
    last_modified: HeaderValue,
    modified: SystemTime,
}

impl StaticFile {
    /// Reads `path` and checks it is JSON (what Apple and Google fetch).
    pub fn load(path: &Path) -> Result<Self, String> {
        let body = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        serde_json::from_slice::<serde::de::IgnoredAny>(&body)
            .map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        // Content-derived, so replicas serving the same file agree on it.
        let etag = format!("\"{:016x}\"", crate::hash::fnv1a(&body));
        Ok(Self {
            path: path.to_path_buf(),
            etag: HeaderValue::from_str(&etag).map_err(|e| e.to_string())?,
            last_modified: HeaderValue::from_str(&httpdate::fmt_http_date(modified)).map_err(|e| e.to_string())?,
            body: Bytes::from(body),
            modified,
        })
    }

    /// The answer to a request for this file: 200 (GET) or its head (HEAD),
    /// 304 when the client's validators match, 405 for other methods.
    pub fn respond(&self, method: &Method, request: &HeaderMap) -> Response<Bytes> {
        if method != Method::GET && method != Method::HEAD {
            return Local::new(StatusCode::METHOD_NOT_ALLOWED)
                .header(header::ALLOW, HeaderValue::from_static("GET, HEAD"))
                .empty();
        }
        let validators = |status| {
            Local::new(status)
                .header(header::ETAG, self.etag.clone())
                .header(header::LAST_MODIFIED, self.last_modified.clone())
        };
        if self.not_modified(request) {
            return validators(StatusCode::NOT_MODIFIED).empty();
        }
        let resp = validators(StatusCode::OK)
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        if method == Method::GET {
            resp.body(self.body.clone())
        } else {
            resp.empty()
        }
    }

    /// RFC 9110 §13.1: If-None-Match (weak comparison) wins over If-Modified-Since.
    fn not_modified(&self, request: &HeaderMap) -> bool {
        let mut tags = request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .peekable();
        if tags.peek().is_some() {
            let ours = self.etag.to_str().unwrap_or_default();
            return tags.any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == ours);
        }
        request
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
            .is_some_and(|since| {
                // Last-Modified has one-second resolution.
                let modified = self
                    .modified
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) >= modified
            })
    }
}

/// Checks a configured URL path: absolute, no query or fragment.
pub fn check_url_path(path: &str) -> Result<(), String> {
    let valid = path.starts_with('/') && !path.contains(['?', '#']) && path.parse::<http::uri::PathAndQuery>().is_ok();
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{path:?} is not a URL path (like \"/.well-known/assetlinks.json\")"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validators_and_methods() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let path = dir.path().join("aasa.json");
        std::fs::write(&path, br#"{"applinks":{"details":[]}}"#).expect("write");
        let f = StaticFile::load(&path).expect("load");
        let mut h = HeaderMap::new();
        let r = f.respond(&Method::GET, &h);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(&r.body()[..], br#"{"applinks":{"details":[]}}"#);
        let etag = r.headers()[header::ETAG].clone();
        assert_eq!(f.respond(&Method::HEAD, &h).body().len(), 0);
        assert_eq!(f.respond(&Method::HEAD, &h).headers()[header::CONTENT_LENGTH], "27");
        h.insert(header::IF_NONE_MATCH, etag.clone());
        assert_eq!(f.respond(&Method::GET, &h).status(), 304);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(f.respond(&Method::GET, &h).status(), 200);
        let mut h = HeaderMap::new();
        h.insert(header::IF_MODIFIED_SINCE, r.headers()[header::LAST_MODIFIED].clone());
        assert_eq!(f.respond(&Method::GET, &h).status(), 304);
        h.insert(
            header::IF_MODIFIED_SINCE,
            HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        );
        assert_eq!(f.respond(&Method::GET, &h).status(), 200);
        assert_eq!(f.respond(&Method::POST, &HeaderMap::new()).status(), 405);

        std::fs::write(&path, b"{not json").expect("write");
        assert!(StaticFile::load(&path).expect_err("invalid").contains("not valid JSON"));
        assert!(check_url_path("/apple-app-site-association").is_ok());
        assert!(check_url_path("apple").is_err());
        assert!(check_url_path("/a?b").is_err());
    }
}
