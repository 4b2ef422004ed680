//! TLS: the crypto providers, reading PEM files, checking that a
//! certificate fits its key and its host, the certificate slot, and the
//! server-side configuration that picks a certificate by SNI.
//!
//! Beside it: `tls/stream.rs`, the server side of a client's TLS connection
//! (rustls's unbuffered API); `tls/inspect.rs`, a certificate's fields read
//! for reports; `tls/failure.rs`, why a handshake linkgate made as a client
//! failed, in plain words.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ParsedCertificate, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::host::HostName;

pub mod failure;
mod inspect;
pub mod stream;

pub use inspect::{is_public_root_subject, not_after, summarize, CertSummary};

/// The TLS alert record a server sends to refuse a ClientHello whose SNI it
/// does not serve: a plaintext record (content type 21, TLS 1.2 framing,
/// length 2) carrying level fatal (2) and `unrecognized_name` (112).
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];

/// The crypto provider used for every TLS context in the process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The provider for the TLS server: the same suites, AES-128-GCM first.
///
/// The server chooses the suite (`ignore_client_order`). AES-128-GCM with
/// SHA-256 is as safe as AES-256-GCM with SHA-384 and costs less: aws-lc
/// computes SHA-384 without SIMD on some CPUs (AMD), which made it 15% of a
/// full handshake's CPU; SHA-256 uses the CPU's SHA instructions. Browsers
/// prefer AES-128-GCM anyway; OpenSSL-based clients (mail scanners, curl)
/// ask for AES-256 first.
pub fn server_provider() -> Arc<CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

/// Reads every certificate in a PEM file, in file order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse_certs(&pem).map_err(|m| format!("{}: {m}", path.display()))
}

/// Every certificate in PEM text, in order.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&e))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse_key(&pem).map_err(|m| format!("{}: {m}", path.display()))
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in PEM text.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_error(&e))
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM private key found (PKCS#8, PKCS#1 or SEC1)".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// Loads a certificate chain and its key and checks that they belong together.
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, String> {
    let chain = load_certs(cert_path)?;
    let key = load_key(key_path)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable private key: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => key_mismatch(cert_path, key_path),
        other => format!(
            "{}: cannot check that it is the private key of the certificate in {}: {other}",
            key_path.display(),
            cert_path.display()
        ),
    })?;
    Ok(certified)
}

/// The words for a key that is not its certificate's: what is wrong, and
/// the command that shows it. Starts with [`KEY_MISMATCH`].
pub fn key_mismatch(cert_path: &Path, key_path: &Path) -> String {
    let (cert, key) = (cert_path.display(), key_path.display());
    format!(
        "{KEY_MISMATCH}: {key} is not the private key of the certificate in {cert} (their public keys differ); \
         compare them with `openssl x509 -noout -pubkey -in {cert} | sha256sum` and \
         `openssl pkey -pubout -in {key} | sha256sum`, which print the same for a matching pair"
    )
}

/// How every key-mismatch message begins.
pub const KEY_MISMATCH: &str = "key does not match the certificate";

/// The public key (SubjectPublicKeyInfo DER) of the private key in `path`.
pub fn key_spki(path: &Path) -> Option<Vec<u8>> {
    let key = provider().key_provider.load_private_key(load_key(path).ok()?).ok()?;
    Some(key.public_key()?.as_ref().to_vec())
}

/// The public key (SubjectPublicKeyInfo DER) of the first certificate in `path`.
pub fn cert_spki(path: &Path) -> Option<Vec<u8>> {
    let chain = load_certs(path).ok()?;
    let parsed = ParsedCertificate::try_from(chain.first()?).ok()?;
    Some(parsed.subject_public_key_info().as_ref().to_vec())
}

/// Reads a DER OCSP response to staple. Only its envelope is checked (a
/// successful OCSPResponse); whoever fetches it (e.g. `openssl ocsp` from
/// cron) is responsible for its freshness, and a reload picks up a new one.
pub fn load_ocsp(path: &Path) -> Result<Vec<u8>, String> {
    let der = std::fs::read(path).map_err(|e| format!("{}: cannot read OCSP response: {e}", path.display()))?;
    check_ocsp(&der).map_err(|m| format!("{}: {m}", path.display()))?;
    Ok(der)
}

/// Checks the envelope of a DER OCSP response: a SEQUENCE starting with
/// responseStatus successful.
pub fn check_ocsp(der: &[u8]) -> Result<(), String> {
    // OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED, responseBytes [0] EXPLICIT ... }
    let header_len = match der.get(1) {
        Some(&n) if n < 0x80 => 2,
        Some(&n) if (0x81..=0x84).contains(&n) => 2 + usize::from(n - 0x80),
        _ => 0,
    };
    match (der.first(), der.get(header_len..header_len + 3)) {
        (Some(0x30), Some([0x0a, 0x01, 0x00])) if header_len > 0 => Ok(()),
        (Some(0x30), Some([0x0a, 0x01, status])) if header_len > 0 => {
            Err(format!("OCSP response status is {status}, not successful (0)"))
        }
        _ => Err("not a DER OCSP response".into()),
    }
}

/// Checks that the leaf certificate of `ck` is valid for `host` by the same
/// rules a browser applies. The error lists the names the certificate does
/// have, and explains the one-label wildcard rule when that is the cause.
pub fn check_covers(ck: &CertifiedKey, host: &HostName) -> Result<(), String> {
    let Ok(leaf) = ck.end_entity_cert() else {
        return Err("empty certificate chain".into());
    };
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| format!("leaf certificate cannot be parsed: {e}"))?;
    let server_name =
        ServerName::try_from(host.as_str().to_owned()).map_err(|e| format!("not a valid server name: {e}"))?;
    if rustls::client::verify_server_name(&parsed, &server_name).is_ok() {
        return Ok(());
    }
    let names = dns_names(leaf);
    let mut message = format!(
        "certificate does not cover this host (its names: {})",
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    );
    if let Some(wildcard) = names.iter().find(|n| nested_under_wildcard(n, host.as_str())) {
        message.push_str(&format!(
            "; a wildcard covers exactly one label: {wildcard} covers a{} but not {host}",
            &wildcard[1..]
        ));
    }
    Err(message)
}

/// The DNS names in a certificate's subjectAltName extension.
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect()
}

/// True when `wildcard` is `*.suffix` and `host` sits more than one label below `suffix`.
fn nested_under_wildcard(wildcard: &str, host: &str) -> bool {
    let Some(suffix) = wildcard.strip_prefix("*.") else {
        return false;
    };
    let suffix = suffix.to_ascii_lowercase();
    host.strip_suffix(&suffix)
        .and_then(|rest| rest.strip_suffix('.'))
        .is_some_and(|labels| labels.contains('.'))
}

/// The certificate slot of one ACME host: empty until its first certificate
/// is issued, then swapped at each renewal by its ACME task; read on every
/// handshake for the host.
pub type Slot = Arc<arc_swap::ArcSwapOption<CertifiedKey>>;

/// Picks the certificate for a handshake by its SNI (exact, normalised name):
/// a host's `cert`/`key` files, or the slot its ACME task keeps filled.
#[derive(Debug)]
pub struct SniResolver {
    by_name: HashMap<HostName, Arc<CertifiedKey>>,
    acme: HashMap<HostName, Slot>,
}

impl SniResolver {
    pub fn new(
        hosts: impl IntoIterator<Item = (HostName, Arc<CertifiedKey>)>,
        acme: impl IntoIterator<Item = (HostName, Slot)>,
    ) -> Self {
        Self {
            by_name: hosts.into_iter().collect(),
            acme: acme.into_iter().collect(),
        }
    }

    /// The certificate served for `host` now, if any.
    pub fn certificate(&self, host: &HostName) -> Option<Arc<CertifiedKey>> {
        match self.by_name.get(host) {
            Some(ck) => Some(ck.clone()),
            None => self.acme.get(host)?.load_full(),
        }
    }

    /// The configured host an SNI value names, if it has a certificate.
    pub fn host_for(&self, sni: &str) -> Option<&HostName> {
        let name = HostName::parse(sni).ok()?;
        if let Some((k, _)) = self.by_name.get_key_value(&name) {
            return Some(k);
        }
        self.acme
            .get_key_value(&name)
            .filter(|(_, slot)| slot.load().is_some())
            .map(|(k, _)| k)
    }

    /// The ACME host an SNI value names, whether or not it has a certificate yet.
    pub fn acme_host(&self, sni: &str) -> Option<&HostName> {
        let name = HostName::parse(sni).ok()?;
        self.acme.get_key_value(&name).map(|(k, _)| k)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = HostName::parse(client_hello.server_name()?).ok()?;
        self.certificate(&name)
    }
}

/// Builds the listener's TLS configuration: TLS 1.3 and 1.2 only, ALPN h2,
/// http/1.1 and http/1.0 (served by the HTTP/1 path, which answers 1.0
/// requests as 1.1 servers do), certificates chosen by `resolver`, stateless session tickets
/// plus an in-memory session cache for resumption.
///
/// The ticketer and session cache are passed in so that one pair serves the
/// whole process: resumption keeps working across reloads.
pub fn server_config(
    resolver: Arc<SniResolver>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions + Send + Sync>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(server_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // In our order of preference; only `h2` selects HTTP/2 (server::connection).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    // Our suite order (all AEAD with forward secrecy, see `server_provider`), not the client's.
    config.ignore_client_order = true;
    config.ticketer = ticketer;
    config.session_storage = sessions;
    Ok(Arc::new(config))
}

/// The TLS configuration for HTTP/3 over QUIC: TLS 1.3 only (as QUIC
/// requires), ALPN `h3` only, the same provider and suite order as TCP,
/// certificates chosen by `resolver` (an unknown or missing SNI resolves to
/// nothing, which fails the handshake), and the process's ticketer and
/// session cache.
///
/// 0-RTT is off (`max_early_data_size = 0`, rustls's default, set here so
/// that it stays so): early data can be replayed by anyone who saw it,
/// and a replayed click counts twice, a replayed one-click unsubscribe
/// POST is worse. Session tickets issued over QUIC therefore allow none.
/// (The tickets are stateless, from the shared ticketer, and rustls never
/// allows early data with those either: a second lock on the same door.)
pub fn quic_server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions + Send + Sync>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(server_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h3".to_vec()];
    config.ignore_client_order = true;
    config.max_early_data_size = 0;
    config.ticketer = ticketer;
    config.session_storage = sessions;
    Ok(config)
}

/// A client configuration verifying servers against `ca_certs`, or the public
/// web roots built into linkgate when `None` (the upstream, the ACME server).
pub fn client_config(ca_certs: Option<&[CertificateDer<'static>]>) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_certs {
        Some(certs) => {
            for cert in certs {
                roots.add(cert.clone())?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_nesting_is_detected() {
        assert!(nested_under_wildcard("*.example.com", "a.b.example.com"));
        assert!(!nested_under_wildcard("*.example.com", "a.example.com"));
        assert!(!nested_under_wildcard("*.example.com", "example.com"));
        assert!(!nested_under_wildcard("*.example.com", "a.b.example.org"));
        assert!(!nested_under_wildcard("a.example.com", "a.b.example.com"));
        assert!(!nested_under_wildcard("*.example.com", "a.bexample.com"));
    }

    #[test]
    fn alert_record_is_fatal_unrecognized_name() {
        assert_eq!(UNRECOGNIZED_NAME_ALERT[0], 21, "alert content type");
        assert_eq!(&UNRECOGNIZED_NAME_ALERT[5..], &[2, 112]);
    }
}
