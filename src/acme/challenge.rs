//! The ACME challenges on the request path: HTTP-01 answers on the plain
//! listener, the TLS-ALPN-01 certificate in the handshake, both read from
//! storage (whichever replica wrote them); and the files an attempt writes.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::{pem_key, Storage};
use crate::config::Acme;
use crate::host::HostName;
use crate::metrics::{ChallengeLabels, Metrics};
use crate::response::Local;
use crate::tls;

/// The ALPN protocol a TLS-ALPN-01 validation offers (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Where HTTP-01 challenge tokens are fetched (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Challenge files written for one attempt; removed when dropped.
#[derive(Default)]
pub(super) struct ChallengeFiles(pub(super) Vec<PathBuf>);

impl Drop for ChallengeFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// True for an HTTP-01 token: base64url characters only (RFC 8555 §8.3).
pub(super) fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Answers `GET /.well-known/acme-challenge/<token>` for an ACME host on the
/// plain-http listener, from storage (whichever replica wrote it).
pub async fn answer_http01(
    acme: Option<&Acme>,
    metrics: &Metrics,
    host: &HostName,
    token: &str,
    method: &Method,
) -> Response<Bytes> {
    // text/plain without a charset: the key authorization is ASCII.
    let respond = |status: StatusCode, body: Bytes| {
        Local::new(status)
            .header(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"))
            .body(body)
    };
    if method != Method::GET && method != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"method not allowed\n"),
        );
    }
    let Some(acme) = acme.filter(|_| valid_token(token)) else {
        return respond(StatusCode::NOT_FOUND, Bytes::from_static(b"no such challenge\n"));
    };
    match tokio::fs::read(Storage::new(&acme.storage).http01_path(token)).await {
        Ok(answer) => {
            metrics
                .acme_challenges
                .get_or_create(&ChallengeLabels {
                    host: host.to_string(),
                    challenge: "http-01",
                })
                .inc();
            tracing::info!(host = %host, "ACME: answered an http-01 challenge");
            respond(StatusCode::OK, Bytes::from(answer))
        }
        Err(_) => respond(StatusCode::NOT_FOUND, Bytes::from_static(b"no such challenge\n")),
    }
}

/// The TLS configuration that answers a TLS-ALPN-01 validation for `host`,
/// if a challenge for it is pending in storage (written by any replica).
pub async fn alpn01_config(acme: &Acme, host: &HostName) -> Option<Arc<ServerConfig>> {
    let pem = tokio::fs::read(Storage::new(&acme.storage).alpn01_path(host))
        .await
        .ok()?;
    let certified = Arc::new(pem_key(&pem).ok()?);
    let mut config = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .ok()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ChallengeCert(certified)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Some(Arc::new(config))
}

/// Serves the one TLS-ALPN-01 certificate, whatever the ClientHello says.
#[derive(Debug)]
struct ChallengeCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for ChallengeCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge (RFC
/// 8737): the host's name and the key authorization's digest in the
/// acmeIdentifier extension; with its key, as PEM.
pub(super) fn alpn01_certificate(host: &HostName, digest: &[u8]) -> Result<String, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_certificate_is_usable_despite_its_critical_extension() {
        let host = HostName::parse("a.example.test").expect("host");
        let pem = alpn01_certificate(&host, &[7u8; 32]).expect("certificate");
        let key = pem_key(pem.as_bytes()).expect("usable");
        let der = key.cert[0].as_ref();
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31 (RFC 8737 §6.1)
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        assert!(
            der.windows(oid.len()).any(|w| w == oid),
            "acmeIdentifier extension present"
        );
        assert!(der.windows(14).any(|w| w == b"a.example.test"), "host name present");
    }

    #[test]
    fn tokens_are_base64url_only() {
        assert!(valid_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(!valid_token("../../etc/passwd"));
        assert!(!valid_token(""));
        assert!(!valid_token("a.b"));
    }
}
