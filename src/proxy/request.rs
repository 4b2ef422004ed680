//! The request as the upstream gets it, and what is refused before it
//! goes: its host, framing that an upstream could read differently, the
//! headers rewritten (Host, X-Forwarded-*, hop-by-hop and client-address
//! claims), and whether the connection closes after it.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

use super::ProxyError;
use crate::connection::ConnInfo;
use crate::host::HostName;

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Other headers that claim a client address. Providers read the client's
/// address (SendGrid's Apple Mail Privacy detection, for one), so from
/// anyone but a trusted proxy these are dropped, never passed on.
pub(crate) static CLIENT_ADDRESS_CLAIMS: [HeaderName; 5] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-client-ip"),
];

/// Headers that describe one hop and are never passed on (RFC 9110 §7.6.1),
/// in addition to the names a `Connection` header lists.
pub(crate) static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why an HTTP/1 request ends its connection after its answer.
pub(super) enum Closes {
    /// The client asked (HTTP/1.0, `Connection: close`): this request is its last.
    ClientDone,
    /// Transfer-Encoding: hyper may have dropped a Content-Length beside it
    /// and then closes; what the client sends next is unknown.
    Unsettled,
}

/// `None` when an HTTP/1 request leaves the connection open for the next
/// one: HTTP/1.1, no `Connection: close`, and no Transfer-Encoding. Anything
/// else must not be resumed after parking.
pub(super) fn close_asked<B>(req: &Request<B>) -> Option<Closes> {
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        Some(Closes::Unsettled)
    } else if req.version() != Version::HTTP_11
        || headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "close"))
    {
        Some(Closes::ClientDone)
    } else {
        None
    }
}

/// True when a comma-separated header value lists `token` (case-insensitive).
pub(super) fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// HTTP/2 may split the cookie header into several fields; an HTTP/1.1
/// upstream gets them as one, joined with `; ` (RFC 9113 §8.2.3).
pub(super) fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// The size of a request head as sent upstream in HTTP/1.1: request line,
/// header lines, blank line.
pub(super) fn head_size(parts: &http::request::Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = parts.method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + headers + 2
}

/// Refuses what an upstream (or anything between) could frame differently
/// from us, and protocol switches: linkgate forwards requests, never tunnels.
/// HTTP/2 framing is checked by the h2 codec (which also rejects
/// connection-specific headers); HTTP/3's here ([`check_http3_fields`]), as
/// the h3 codec does not.
pub(super) fn check_framing<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let headers = req.headers();
    if req.version() == Version::HTTP_3 {
        check_http3_fields(headers)?;
    }
    if headers.contains_key(header::UPGRADE) {
        return Err(ProxyError::BadRequest("protocol upgrades are not supported\n"));
    }
    // hyper's HTTP/1 parser already refuses Transfer-Encoding in HTTP/1.0 and
    // codings not ending in chunked, and frames a request carrying both
    // Content-Length and Transfer-Encoding by the latter alone, closing the
    // connection after it (RFC 9112 §6.1). What it lets through and we do
    // not: any coding besides chunked, which the upstream would have to undo.
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(coding) = codings.next() {
        if codings.next().is_some() || !coding.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(ProxyError::BadRequest("Transfer-Encoding other than chunked\n"));
        }
    }
    Ok(())
}

/// What makes an HTTP/3 request malformed in its fields (RFC 9114 §4.2,
/// §4.1.2), refused as h2 refuses it in HTTP/2: a connection-specific field
/// (HTTP/3 has no connection-level framing to speak of, and an upstream
/// reading these in an HTTP/1.1 request would frame it differently), TE
/// other than `trailers`, and a Content-Length that is not exactly one
/// decimal number (several fields, a list, a sign, spaces).
fn check_http3_fields(headers: &HeaderMap) -> Result<(), ProxyError> {
    const CONNECTION_SPECIFIC: [&str; 5] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ];
    if CONNECTION_SPECIFIC.iter().any(|name| headers.contains_key(*name)) {
        return Err(ProxyError::BadRequest(
            "connection-specific header in an HTTP/3 request\n",
        ));
    }
    if headers
        .get_all(header::TE)
        .iter()
        .any(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        return Err(ProxyError::BadRequest("TE other than trailers in an HTTP/3 request\n"));
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(length) = lengths.next() {
        let digits = length.as_bytes();
        let decimal = !digits.is_empty() && digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit);
        if lengths.next().is_some() || !decimal {
            return Err(ProxyError::BadRequest("invalid Content-Length\n"));
        }
    }
    Ok(())
}

/// The host a request names, from its target's authority (absolute-form or
/// HTTP/2 `:authority`) and its Host header. Both present and disagreeing,
/// several Host headers, or neither present: refused.
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<HostName, ProxyError> {
    let mut values = req.headers().get_all(header::HOST).iter();
    let header_value = values.next();
    if values.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header\n"));
    }
    let from_header = header_value
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| HostName::from_authority(s).ok())
                .ok_or(ProxyError::BadRequest("invalid Host header\n"))
        })
        .transpose()?;
    let from_target = req
        .uri()
        .authority()
        .map(|a| HostName::from_authority(a.as_str()).map_err(|_| ProxyError::BadRequest("invalid request target\n")))
        .transpose()?;
    match (from_target, from_header) {
        (Some(t), Some(h)) if t != h => Err(ProxyError::BadRequest("Host header and request target disagree\n")),
        (Some(t), _) => Ok(t),
        (None, Some(h)) => Ok(h),
        (None, None) => Err(ProxyError::BadRequest("missing Host header\n")),
    }
}

/// Prepares request headers for the upstream: hop-by-hop headers removed,
/// Host set to the branded name, X-Forwarded-For appended to (trusted peers)
/// or replaced (anyone else), other client-address claims kept from a
/// trusted peer only, X-Forwarded-Proto kept from a trusted peer or set,
/// X-Forwarded-Host set.
pub(crate) fn rewrite_request_headers(headers: &mut HeaderMap, host: &HostName, conn: &ConnInfo) {
    strip_hop_by_hop(headers);
    // A HostName is a valid header value by construction (letters, digits, '-', '_', '.').
    if let Ok(value) = HeaderValue::from_str(host.as_str()) {
        headers.insert(header::HOST, value.clone());
        headers.insert(X_FORWARDED_HOST.clone(), value);
    }
    let client_ip = conn.peer.ip().to_string();
    let forwarded_for = {
        let mut previous = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        if conn.keep_forwarded && previous.peek().is_some() {
            let mut list = previous.collect::<Vec<_>>().join(", ");
            list.push_str(", ");
            list.push_str(&client_ip);
            list
        } else {
            client_ip
        }
    };
    headers.remove(&X_FORWARDED_FOR);
    if !conn.keep_forwarded {
        for name in &CLIENT_ADDRESS_CLAIMS {
            headers.remove(name);
        }
    }
    drop_underscore_twins(headers);
    // From the String itself, not a copy of it.
    if let Ok(value) = HeaderValue::try_from(forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    // Kept from a trusted proxy only when it sent exactly one: several could be read either way.
    if !(conn.keep_forwarded && headers.get_all(&X_FORWARDED_PROTO).iter().count() == 1) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(conn.proto()));
    }
}

/// Removes headers that spell one of the forwarding headers linkgate sets or
/// checks with `_` for `-` (`X_Forwarded_For`, `X_Real_IP`): backends that
/// map names CGI-style (`HTTP_X_REAL_IP`) read them as the real thing, so
/// they would carry a client's claim past the checks above. From anyone.
fn drop_underscore_twins(headers: &mut HeaderMap) {
    let twins: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .filter(|name| {
            let folded = name.as_str().replace('_', "-");
            [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST]
                .into_iter()
                .chain(&CLIENT_ADDRESS_CLAIMS)
                .any(|known| known.as_str() == folded)
        })
        .cloned()
        .collect();
    for name in twins {
        headers.remove(name);
    }
}

/// Removes hop-by-hop headers and every header the Connection header names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).expect("test request")
    }

    fn host_of(r: &Request<()>) -> Result<String, u16> {
        request_host(r).map(|h| h.to_string()).map_err(|e| e.status().as_u16())
    }

    #[test]
    fn request_host_rules() {
        assert_eq!(
            host_of(&req("/x", &["Click.Example.Test:8443"])),
            Ok("click.example.test".into())
        );
        assert_eq!(host_of(&req("https://a.test/x", &[])), Ok("a.test".into()));
        assert_eq!(host_of(&req("https://a.test/x", &["a.test"])), Ok("a.test".into()));
        assert_eq!(host_of(&req("https://a.test/x", &["b.test"])), Err(400));
        assert_eq!(host_of(&req("/x", &["a.test", "a.test"])), Err(400));
        assert_eq!(host_of(&req("/x", &[])), Err(400));
        assert_eq!(host_of(&req("/x", &[""])), Err(400));
        assert_eq!(host_of(&req("/x", &["a.test/evil"])), Err(400));
    }

    #[test]
    fn header_rewrite() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("wrong.test"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TRAILER, HeaderValue::from_static("x"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.2"));
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("ftp"));
        h.insert(header::USER_AGENT, HeaderValue::from_static("ua"));
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        let host = HostName::parse("url1.example.com").expect("valid");
        let conn = ConnInfo::new(
            "203.0.113.7:5555".parse().expect("addr"),
            Some(host.clone()),
            true,
            None,
        );
        let mut untrusted = h.clone();
        rewrite_request_headers(&mut h, &host, &conn);
        assert_eq!(h["host"], "url1.example.com");
        assert_eq!(h["x-forwarded-host"], "url1.example.com");
        assert_eq!(h["x-forwarded-proto"], "ftp", "kept from a trusted peer");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 198.51.100.2, 203.0.113.7");
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-connection",
            "trailer",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h["user-agent"], "ua");
        assert_eq!(h["cookie"], "a=b");

        // From an untrusted peer the client's claims are replaced, not extended.
        for twin in ["x_forwarded_for", "x_real_ip", "cf_connecting_ip", "x_forwarded_host"] {
            untrusted.insert(HeaderName::from_static(twin), HeaderValue::from_static("6.6.6.6"));
        }
        untrusted.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        untrusted.insert("x_kept_with_underscore", HeaderValue::from_static("1"));
        let conn = ConnInfo::new(conn.peer, conn.sni.clone(), false, None);
        rewrite_request_headers(&mut untrusted, &host, &conn);
        assert_eq!(untrusted["x-forwarded-for"], "203.0.113.7");
        for gone in [
            "x_forwarded_for",
            "x_real_ip",
            "cf_connecting_ip",
            "x_forwarded_host",
            "x-real-ip",
        ] {
            assert!(!untrusted.contains_key(gone), "{gone} passed through");
        }
        assert_eq!(untrusted["x_kept_with_underscore"], "1");
        assert_eq!(untrusted["x-forwarded-proto"], "https");
    }
}
