//! One GET to a provider's API over linkgate's own HTTP stack: hyper's
//! HTTP/1.1 client on tokio-rustls, the certificate verified for the API's
//! host against the public web roots (or `--provider-api-ca`'s), with the
//! upstream's TLS settings ([`crate::tls::client_config`]). The connection
//! is bounded by the timeout, and so is the whole request with its answer,
//! whose body is capped. A fresh connection per request: a listing is a
//! handful of requests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::AccountError;

/// The largest answer read: a page of brandings is a few kilobytes each.
const MAX_BODY: usize = 8 << 20;

/// An API base (`https://host[:port]`) and how to reach it.
pub(super) struct Api {
    base: String,
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    timeout: Duration,
}

/// What one GET got.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Api {
    /// The API at `base`, which must be `https://host[:port]` with no path:
    /// the key is never sent in clear.
    pub(super) fn new(base: &str, ca_file: Option<&std::path::Path>, timeout: Duration) -> Result<Self, AccountError> {
        let usage = |m: &str| AccountError::Usage(format!("--provider-api {}: {m}", crate::text::printable(base)));
        let uri: http::Uri = base.parse().map_err(|_| usage("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(usage("must start with https:// (the API key must not travel in clear)"));
        }
        let authority = uri.authority().ok_or_else(|| usage("no host"))?;
        if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(usage("give only https://, the host and an optional port"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name = ServerName::try_from(host.clone()).map_err(|_| usage("not a valid TLS server name"))?;
        let ca = match ca_file {
            Some(path) => {
                Some(crate::tls::load_certs(path).map_err(|m| AccountError::Usage(format!("--provider-api-ca {m}")))?)
            }
            None => None,
        };
        let mut tls = crate::tls::client_config(ca.as_deref())
            .map_err(|e| AccountError::Usage(format!("--provider-api-ca: {e}")))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            base: format!("https://{authority}"),
            host,
            port: authority.port_u16().unwrap_or(443),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            name,
            timeout,
        })
    }

    /// `https://host[:port]`, as asked.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// `GET path_and_query` with `headers`: connected within the timeout, and
    /// the whole answer, body included, within the timeout again.
    pub(super) async fn get(&self, path_and_query: &str, headers: HeaderMap) -> Result<Answer, AccountError> {
        let url = format!("{}{path_and_query}", self.base);
        let unreachable = |what: String| AccountError::Unreachable(format!("GET {url}: {what}"));
        let tcp = tokio::time::timeout(self.timeout, self.connect())
            .await
            .map_err(|_| unreachable(format!("no connection within {:?}", self.timeout)))?
            .map_err(|e| unreachable(format!("cannot connect to {}:{}: {e}", self.host, self.port)))?;
        let exchange = async {
            let tls = self
                .tls
                .connect(self.name.clone(), tcp)
                .await
                .map_err(|e| unreachable(tls_failure(&self.host, &e)))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(format!("HTTP/1.1 handshake failed: {e}")))?;
            tokio::spawn(conn);
            let mut request = Request::get(path_and_query)
                .body(Empty::new())
                .map_err(|e| AccountError::Usage(format!("GET {url}: {e}")))?;
            let authority = match self.port {
                443 => self.base_host(),
                port => format!("{}:{port}", self.base_host()),
            };
            let host = HeaderValue::from_str(&authority).map_err(|e| AccountError::Usage(format!("{url}: {e}")))?;
            request.headers_mut().insert(http::header::HOST, host);
            request.headers_mut().extend(headers);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unreachable(format!("the request failed: {}", crate::error::chain(&e))))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    AccountError::Answer(format!("GET {url}: the answer is larger than {} MiB", MAX_BODY >> 20))
                } else {
                    unreachable(format!("the answer broke off: {e}"))
                }
            })?;
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes(),
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no whole answer within {:?}", self.timeout)))?
    }

    /// The host as written in the base (IPv6 in brackets).
    fn base_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// The first address of the API's host that accepts a connection.
    async fn connect(&self) -> std::io::Result<TcpStream> {
        let mut last = None;
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other(format!("{} has no address", self.host))))
    }
}

/// A failed handshake with the API at `host`: the cause in plain words
/// ([`crate::tls::failure`], as doctor words its probes') and the fix.
fn tls_failure(host: &str, e: &std::io::Error) -> String {
    use crate::tls::failure::Failure;
    let failure = Failure::of(e);
    let fix = match failure {
        Failure::UnknownIssuer | Failure::BadSignature => format!(
            "give --provider-api-ca FILE with the CA certificate that issued {host}'s certificate (SendGrid's own \
             API needs none: then something in between presents another certificate)"
        ),
        Failure::CaAsEndEntity => format!(
            "{host} must serve a certificate issued by a CA, not the CA's own: issue a leaf certificate for {host} \
             from that CA, serve it, and give the CA's certificate as --provider-api-ca"
        ),
        Failure::Expired => format!("{host}'s certificate must be renewed (or this machine's clock is wrong)"),
        Failure::NotValidYet => "check this machine's clock".to_owned(),
        Failure::WrongName => {
            format!("give --provider-api the name {host}'s certificate is issued for, or a certificate naming {host}")
        }
        Failure::UnrecognisedName | Failure::Other(_) | Failure::Handshake(_) => {
            "check that --provider-api names an https API".to_owned()
        }
    };
    format!("TLS with {host} failed: {}: {fix}", failure.cause(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_https_base_without_a_path_is_taken() {
        let t = Duration::from_secs(1);
        assert_eq!(
            Api::new("https://api.sendgrid.com", None, t)
                .map(|a| a.base)
                .ok()
                .as_deref(),
            Some("https://api.sendgrid.com")
        );
        assert_eq!(
            Api::new("https://127.0.0.1:8443/", None, t)
                .map(|a| (a.base, a.port))
                .ok(),
            Some(("https://127.0.0.1:8443".to_owned(), 8443))
        );
        for bad in [
            "http://api.sendgrid.com",
            "https://api.sendgrid.com/v3",
            "https://u:p@api.sendgrid.com",
            "api.sendgrid.com",
            "https://x?q=1",
        ] {
            let err = Api::new(bad, None, t).err();
            assert!(err.as_ref().is_some_and(AccountError::is_usage), "{bad}: {err:?}");
        }
    }
}
