//! Why a TLS handshake linkgate made as a client failed, in plain words:
//! one classification of rustls's error (certificate expired, not yet
//! valid, for another name, from an issuer not trusted, a CA certificate
//! presented as the server's own; the server not serving the name), shared
//! by `doctor`'s https probes and the provider API client, which each add
//! the fix that fits what they connect to.

use rustls::{AlertDescription, CertificateError};

/// What went wrong in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Expired,
    NotValidYet,
    /// The certificate does not name the host asked for.
    WrongName,
    /// No trusted root issued it (unknown CA, or a chain cut short).
    UnknownIssuer,
    /// Its issuer has the name of a trusted CA but not its key: another CA
    /// of the same name issued it.
    BadSignature,
    /// The certificate presented is a CA certificate (a self-signed CA
    /// served as the server's own certificate).
    CaAsEndEntity,
    /// The server answered `unrecognized_name`: it does not serve the host.
    UnrecognisedName,
    /// Another TLS error, as rustls words it.
    Other(String),
    /// Not a TLS error (the connection closed, not TLS at all).
    Handshake(String),
}

impl Failure {
    /// The failure behind the error of a `tokio_rustls` connect.
    pub fn of(e: &std::io::Error) -> Self {
        let Some(error) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
            return Self::Handshake(e.to_string());
        };
        match error {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => Self::NotValidYet,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => Self::WrongName,
                CertificateError::UnknownIssuer => Self::UnknownIssuer,
                CertificateError::BadSignature => Self::BadSignature,
                CertificateError::Other(other)
                    if matches!(
                        other.0.downcast_ref::<webpki::Error>(),
                        Some(webpki::Error::CaUsedAsEndEntity)
                    ) =>
                {
                    Self::CaAsEndEntity
                }
                other => Self::Other(rustls::Error::InvalidCertificate(other.clone()).to_string()),
            },
            rustls::Error::AlertReceived(AlertDescription::UnrecognisedName) => Self::UnrecognisedName,
            other => Self::Other(other.to_string()),
        }
    }

    /// The cause, for a connection to `host`.
    pub fn cause(&self, host: &str) -> String {
        match self {
            Self::Expired => "the certificate has expired".to_owned(),
            Self::NotValidYet => "the certificate is not valid yet".to_owned(),
            Self::WrongName => format!("the certificate is not valid for {host}"),
            Self::UnknownIssuer => "the certificate's issuer is not trusted: unknown CA or incomplete chain".to_owned(),
            Self::BadSignature => {
                "the certificate's signature does not verify with the trusted CA of its issuer's name (another CA \
                 of the same name issued it)"
                    .to_owned()
            }
            Self::CaAsEndEntity => {
                "the certificate is a CA certificate, served as the server's own (a self-signed CA used as a \
                 server certificate)"
                    .to_owned()
            }
            Self::UnrecognisedName => format!("the server does not serve {host} (unrecognized_name)"),
            Self::Other(e) => format!("TLS error: {e}"),
            Self::Handshake(e) => format!("TLS handshake failed: {e}"),
        }
    }
}
