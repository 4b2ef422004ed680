//! The client side of QUIC's TLS: TLS 1.3 on aws-lc-rs (as linkgate's own),
//! ALPN `h3`, and only the certificates of `--ca` trusted, so that the
//! server's certificate is verified for the URL's host like a browser does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Why the client configuration cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--ca {0}: {1}")]
    Read(PathBuf, rustls_pki_types::pem::Error),
    #[error("--ca {0}: no certificate in it")]
    Empty(PathBuf),
    #[error("--ca {0}: not a usable root: {1}")]
    Root(PathBuf, rustls::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// A QUIC client configuration trusting the PEM certificates in `ca`.
pub fn client(ca: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let read = |e| TlsError::Read(ca.to_owned(), e);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(read)? {
        roots
            .add(cert.map_err(read)?)
            .map_err(|e| TlsError::Root(ca.to_owned(), e))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Empty(ca.to_owned()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?)))
}
