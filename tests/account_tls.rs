//! The provider API's TLS failures, as `linkgate import` (and doctor's
//! account audit, which shares the client) reports them: the cause in plain
//! words and the fix, as doctor words its https probes' failures, never
//! rustls's debug text. The real binary runs against the https stand-in of
//! the API (`common::provider_api`) presenting a certificate that fails
//! one way each.

mod common;

use common::doctor::{linkgate, API_KEY_ENV};
use common::provider_api::{no_key, sample_account, strings, ProviderApi, TEST_KEY as KEY};
use common::*;

/// `linkgate import sendgrid` against `api`, trusting `ca`: its one error line.
async fn import(api: &ProviderApi, ca: &std::path::Path) -> String {
    let args = strings(&[
        "import",
        "sendgrid",
        "--provider-api",
        &api.url(),
        "--provider-api-ca",
        &ca.display().to_string(),
    ]);
    let run = linkgate(args, vec![(API_KEY_ENV, KEY.into())]).await;
    no_key(&run, KEY);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    for raw in [
        "OtherError",
        "CaUsedAsEndEntity",
        "UnknownIssuer",
        "invalid peer certificate",
    ] {
        assert!(!run.stderr.contains(raw), "{raw:?} in {run:?}");
    }
    run.stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tls_failures_say_the_cause_and_the_fix() {
    let pki = Pki::new();
    let dir = tempfile::TempDir::new().expect("tempdir");
    let ca = pki.write_ca(dir.path());
    let other = tempfile::TempDir::new().expect("tempdir");
    let other_ca = Pki::new().write_ca(other.path());

    // Signed by an intermediate the file given does not hold (and the API
    // does not send).
    let api = ProviderApi::start_with(&pki.intermediate().leaf(&["127.0.0.1"]), sample_account()).await;
    let said = import(&api, &ca).await;
    assert!(
        said.contains(
            "TLS with 127.0.0.1 failed: the certificate's issuer is not trusted: unknown CA or incomplete chain: \
             give --provider-api-ca FILE with the CA certificate that issued 127.0.0.1's certificate"
        ),
        "{said}"
    );
    assert!(api.received().is_empty());
    // Signed by another CA of the same name as the one in the file.
    let api = ProviderApi::start(&pki, sample_account()).await;
    let said = import(&api, &other_ca).await;
    assert!(
        said.contains(
            "TLS with 127.0.0.1 failed: the certificate's signature does not verify with the trusted CA of its \
             issuer's name (another CA of the same name issued it): give --provider-api-ca FILE with the CA \
             certificate that issued 127.0.0.1's certificate"
        ),
        "{said}"
    );

    // The CA's own certificate served as the API's, and trusted as a root.
    let api = ProviderApi::start_with(&pki.own(), sample_account()).await;
    let said = import(&api, &ca).await;
    assert!(
        said.contains(
            "TLS with 127.0.0.1 failed: the certificate is a CA certificate, served as the server's own (a \
             self-signed CA used as a server certificate): 127.0.0.1 must serve a certificate issued by a CA, not \
             the CA's own: issue a leaf certificate for 127.0.0.1 from that CA"
        ),
        "{said}"
    );

    // Expired.
    let api = ProviderApi::start_with(&pki.leaf_valid(&["127.0.0.1"], days(-30), days(-1)), sample_account()).await;
    let said = import(&api, &ca).await;
    assert!(
        said.contains(
            "TLS with 127.0.0.1 failed: the certificate has expired: 127.0.0.1's certificate must be renewed"
        ),
        "{said}"
    );

    // Issued for another name.
    let api = ProviderApi::start_with(&pki.leaf(&["api.example.test"]), sample_account()).await;
    let said = import(&api, &ca).await;
    assert!(
        said.contains(
            "TLS with 127.0.0.1 failed: the certificate is not valid for 127.0.0.1: give --provider-api the name \
             127.0.0.1's certificate is issued for"
        ),
        "{said}"
    );
}
