//! The test PKI: a certificate authority made with rcgen (and intermediates
//! under it) that issues leaf certificates and writes them as PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;

/// A test certificate authority.
pub struct Pki {
    pub(super) issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
}

/// A certificate and key, as PEM, plus the leaf's DER.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Leaf {
    /// A TLS acceptor presenting this certificate for any name.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let key = <rustls_pki_types::PrivateKeyDer<'static> as rustls_pki_types::pem::PemObject>::from_pem_slice(
            self.key_pem.as_bytes(),
        )
        .expect("key pem");
        let config = rustls::ServerConfig::builder_with_provider(linkgate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.der.clone()], key)
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Pki {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, "linkgate test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA cert");
        Self {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names`, signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A leaf for `names` valid from `not_before` to `not_after`.
    pub fn leaf_valid(
        &self,
        names: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// An intermediate CA signed by this one; its `ca_pem` is the intermediate's certificate.
    pub fn intermediate(&self) -> Pki {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "linkgate test intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.signed_by(&key, &self.issuer).expect("intermediate");
        Pki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes a leaf for `names` as `<dir>/<stem>.pem` and `<dir>/<stem>.key`.
    pub fn write_leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> Leaf {
        let leaf = self.leaf(names);
        std::fs::write(dir.join(format!("{stem}.pem")), &leaf.cert_pem).expect("write cert");
        std::fs::write(dir.join(format!("{stem}.key")), &leaf.key_pem).expect("write key");
        leaf
    }

    /// The CA's own certificate and key, to serve as if it were a server's
    /// (a self-signed CA used as an end-entity certificate).
    pub fn own(&self) -> Leaf {
        Leaf {
            cert_pem: self.ca_pem.clone(),
            key_pem: self.issuer.key().serialize_pem(),
            der: self.ca_der.clone(),
        }
    }

    /// Writes the CA's private key (PEM) to `<dir>/ca.key`, for tools that sign as the CA.
    pub fn write_ca_key(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.key");
        std::fs::write(&path, self.issuer.key().serialize_pem()).expect("write CA key");
        path
    }

    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("write CA");
        path
    }
}

/// `n` days from now (before now when negative), for certificate validity.
pub fn days(n: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(n)
}
