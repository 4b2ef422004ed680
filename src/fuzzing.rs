//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, `scripts/fuzz`).
//! Each takes arbitrary bytes, drives one parser the way linkgate does, and
//! panics only when an invariant breaks. Compiled (and so type-checked and
//! linted) with the library; not part of its API.

use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;

use crate::config::Config;
use crate::connection::ConnInfo;
use crate::host::HostName;
use crate::proxy::{self, HOP_BY_HOP, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::server::proxy_protocol;
use crate::tls;

/// Config parsing and validation: never panics, and every refusal is one line.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for path in ["/nonexistent/linkgate.toml", "linkgate.toml"] {
        if let Err(e) = Config::from_toml(text, Path::new(path)) {
            let line = e.to_string();
            assert!(!line.contains('\n'), "a config error must be one line: {line:?}");
        }
        if let Ok(outline) = crate::config::Outline::parse(text, Path::new(path)) {
            let _ = outline.host_entries();
            let _ = outline.host_names();
            let _ = outline.host_providers();
            let _ = outline.acme_storage();
            let _ = outline.admin_address();
        }
    }
}

/// Host-name and authority matching, as for SNI, Host and request targets.
/// The input is `target\nhost-header`.
pub fn authority(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for h in [HostName::parse(text), HostName::from_authority(text)]
        .into_iter()
        .flatten()
    {
        // Normalised: lower case, a valid header value, and parsing it again changes nothing.
        assert!(!h.as_str().bytes().any(|b| b.is_ascii_uppercase()), "{h}");
        assert!(HeaderValue::from_str(h.as_str()).is_ok(), "{h}");
        assert_eq!(HostName::parse(h.as_str()).as_ref(), Ok(&h));
        assert_eq!(HostName::from_authority(h.as_str()).as_ref(), Ok(&h));
    }
    // An SNI (a bare name) and a Host header without a port name the same host.
    if let (Ok(a), Ok(b)) = (HostName::parse(text), HostName::from_authority(text)) {
        assert_eq!(a, b);
    }

    let (target, host) = text.split_once('\n').unwrap_or((text, ""));
    let mut builder = Request::builder().uri(target);
    if !host.is_empty() {
        builder = builder.header(header::HOST, host);
    }
    let Ok(req) = builder.body(()) else { return };
    if let Ok(h) = proxy::request_host(&req) {
        // The host forwarded is the one the request names, from both places when both are given.
        // Outer Option: the part is present; inner: it parses (it must, if accepted).
        let from_header = req
            .headers()
            .get(header::HOST)
            .map(|v| v.to_str().ok().and_then(|s| HostName::from_authority(s).ok()));
        let from_target = req.uri().authority().map(|a| HostName::from_authority(a.as_str()).ok());
        assert!(from_header.is_some() || from_target.is_some());
        for named in [from_header, from_target].into_iter().flatten() {
            assert_eq!(
                named.as_ref(),
                Some(&h),
                "the request names {named:?}, linkgate picked {h}"
            );
        }
    }
}

/// The request header rewrite. The input is header lines, `name: value\n`.
pub fn header_rewrite(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let ours = [
        header::HOST,
        X_FORWARDED_FOR.clone(),
        X_FORWARDED_PROTO.clone(),
        X_FORWARDED_HOST.clone(),
    ];
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let Ok(host) = HostName::parse("url1234.example.com") else {
        unreachable!("a valid literal host name")
    };
    let peer = std::net::SocketAddr::from(([203, 0, 113, 7], 4711));
    for trusted in [false, true] {
        let conn = ConnInfo::new(peer, Some(host.clone()), trusted, None);
        let mut out = headers.clone();
        proxy::rewrite_request_headers(&mut out, &host, &conn);
        let all = |name: &HeaderName| {
            out.get_all(name)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect::<Vec<_>>()
        };
        assert_eq!(all(&header::HOST), [b"url1234.example.com".to_vec()]);
        assert_eq!(all(&X_FORWARDED_HOST), [b"url1234.example.com".to_vec()]);
        let xff = all(&X_FORWARDED_FOR);
        assert_eq!(xff.len(), 1, "one X-Forwarded-For");
        assert!(xff[0].ends_with(b"203.0.113.7"));
        if !trusted {
            assert_eq!(xff[0], b"203.0.113.7");
            assert_eq!(all(&X_FORWARDED_PROTO), [b"https".to_vec()]);
        }
        assert_eq!(all(&X_FORWARDED_PROTO).len(), 1, "one X-Forwarded-Proto");
        for name in HOP_BY_HOP.iter().chain(&listed) {
            if !ours.contains(name) {
                assert!(!out.contains_key(name), "{name} must not be forwarded");
            }
        }
        // Other client-address claims: only from a trusted proxy.
        for name in &proxy::CLIENT_ADDRESS_CLAIMS {
            if !trusted && !ours.contains(name) {
                assert!(!out.contains_key(name), "{name} forwarded from an untrusted peer");
            }
        }
        // Everything else passes through unchanged, in order.
        for name in headers.keys() {
            let folded = name.as_str().replace('_', "-");
            let twin = name.as_str().contains('_')
                && (ours.iter().chain(&proxy::CLIENT_ADDRESS_CLAIMS)).any(|k| k.as_str() == folded);
            let claim = twin || (!trusted && proxy::CLIENT_ADDRESS_CLAIMS.contains(name));
            if !ours.contains(name) && !HOP_BY_HOP.contains(name) && !listed.contains(name) && !claim {
                assert_eq!(
                    headers.get_all(name).iter().collect::<Vec<_>>(),
                    out.get_all(name).iter().collect::<Vec<_>>()
                );
            }
        }
    }
}

/// PEM and DER loading: certificates, keys, OCSP envelopes, certificate summaries.
pub fn pem(data: &[u8]) {
    if let Ok(certs) = tls::parse_certs(data) {
        for cert in &certs {
            let _ = tls::summarize(cert);
            let _ = tls::dns_names(cert);
            let _ = tls::not_after(cert);
        }
    }
    if let Ok(key) = tls::parse_key(data) {
        let _ = tls::provider().key_provider.load_private_key(key);
    }
    let der = rustls_pki_types::CertificateDer::from(data);
    let _ = tls::summarize(&der);
    let _ = tls::dns_names(&der);
    let _ = tls::check_ocsp(data);
}

/// The PROXY protocol reader: never reads past the header it accepts.
pub fn proxy_protocol(data: &[u8]) {
    let mut rest = data;
    let result = {
        let mut read = pin!(proxy_protocol::read_header(&mut rest));
        match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("reading from a byte slice never waits"),
        }
    };
    let consumed = &data[..data.len() - rest.len()];
    if result.is_ok() {
        if consumed.starts_with(b"PROXY") {
            assert!(consumed.ends_with(b"\r\n") && consumed.len() <= 107);
        } else {
            let len = usize::from(u16::from_be_bytes([consumed[14], consumed[15]]));
            assert_eq!(consumed.len(), 16 + len, "v2: exactly the header's bytes");
        }
    }
}
