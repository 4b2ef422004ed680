//! The certificate resolver of whatever configuration is in force, for a
//! TLS context built once for the life of the process (QUIC's: its endpoint
//! keeps one rustls configuration). Each handshake asks the configuration
//! loaded at that moment, so a reload, a new ACME certificate or a new OCSP
//! response applies to the next handshake, exactly as on TCP.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::Live;

/// Resolves through [`Live::load`]'s SNI resolver on every handshake.
pub struct LiveSni(pub Arc<Live>);

impl std::fmt::Debug for LiveSni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSni").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for LiveSni {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().sni.resolve(client_hello)
    }
}

impl Live {
    /// The TLS configuration for HTTP/3 (QUIC), see [`crate::tls::quic_server_config`]:
    /// certificates from the configuration in force at each handshake, the
    /// process's one ticketer and session cache.
    pub fn quic_tls(self: &Arc<Self>) -> Result<rustls::ServerConfig, rustls::Error> {
        crate::tls::quic_server_config(
            Arc::new(LiveSni(self.clone())),
            self.ticketer.clone(),
            self.sessions.clone(),
        )
    }
}
