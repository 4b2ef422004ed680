//! A certificate's fields, read for reports: what `linkgate check` shows
//! (names, validity, key, issuer, and whether that issuer is a public web
//! root), and the end of validity the metrics and ACME go by.

use rustls_pki_types::CertificateDer;

/// What `linkgate check` reports about one certificate.
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub subject_name: String,
    pub issuer_name: String,
    /// DER of the subject and issuer names, for chain matching.
    pub subject_raw: Vec<u8>,
    pub issuer_raw: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub not_after_text: String,
    pub self_signed: bool,
    pub rsa_bits: Option<usize>,
    /// The key's type and size, e.g. `ECDSA P-256`, `RSA 2048`.
    pub key: String,
}

/// Reads the fields `check` needs from a certificate.
pub fn summarize(cert: &CertificateDer<'_>) -> Option<CertSummary> {
    use x509_parser::public_key::PublicKey;
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = |n: &x509_parser::x509::X509Name<'_>| {
        n.iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map_or_else(|| n.to_string(), str::to_owned)
    };
    let (rsa_bits, key) = match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => (Some(rsa.key_size()), format!("RSA {}", rsa.key_size())),
        Ok(PublicKey::EC(ec)) => (None, format!("ECDSA P-{}", ec.key_size())),
        _ => (None, cert.public_key().algorithm.algorithm.to_id_string()),
    };
    Some(CertSummary {
        subject_name: name(cert.subject()),
        issuer_name: name(cert.issuer()),
        subject_raw: cert.subject().as_raw().to_vec(),
        issuer_raw: cert.issuer().as_raw().to_vec(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        not_after_text: {
            let t = cert.validity().not_after.to_datetime();
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        },
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        rsa_bits,
        key,
    })
}

/// True when `issuer` (a DER-encoded Name) is the subject of one of the
/// public web roots built into linkgate.
pub fn is_public_root_subject(issuer: &[u8]) -> bool {
    // Trust anchors store the Name's contents without its outer SEQUENCE header.
    let contents = strip_sequence_header(issuer).unwrap_or(issuer);
    webpki_roots::TLS_SERVER_ROOTS
        .iter()
        .any(|root| root.subject.as_ref() == contents || root.subject.as_ref() == issuer)
}

fn strip_sequence_header(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    if len < 0x80 {
        return rest.get(..usize::from(len));
    }
    let n = usize::from(len & 0x7f);
    let (len_bytes, rest) = (rest.get(..n)?, rest.get(n..)?);
    let len = len_bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    rest.get(..len)
}

/// The end of a certificate's validity, as Unix time.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}
