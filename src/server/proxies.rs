//! One worker's proxy for the configuration in force (each TCP worker and
//! the HTTP/3 thread keep one): looked up per request, rebuilt after a
//! reload keeping the upstream pools whose settings did not change; and the
//! `Alt-Svc` value every https answer carries while HTTP/3 is on.

use std::sync::Arc;

use ::http::HeaderValue;

use crate::proxy::Proxy;
use crate::reload::Live;
use crate::upstream::{self, Upstream};

/// One worker's proxy for the configuration in force, looked up per request
/// so that a reload applies to requests on connections that are already
/// open (files, upstreams, hosts), not only to new connections.
pub(super) struct ProxyCache {
    live: Arc<Live>,
    upstream: upstream::Shared,
    alt_svc: Option<HeaderValue>,
    cached: std::sync::Mutex<Option<Arc<Proxy>>>,
}

impl ProxyCache {
    pub(super) fn new(live: Arc<Live>, upstream: upstream::Shared, alt_svc: Option<HeaderValue>) -> Self {
        Self {
            live,
            upstream,
            alt_svc,
            cached: std::sync::Mutex::new(None),
        }
    }

    /// The proxy for the configuration in force (the previous one if the new
    /// one cannot be built).
    pub(super) fn current(&self) -> Option<Arc<Proxy>> {
        // Uncontended: one worker's connections run on one thread.
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        current_proxy(&self.live, &self.upstream, self.alt_svc.as_ref(), &mut cached)
    }
}

/// `Alt-Svc` advertising HTTP/3 on `port` of the same host for a day (RFC 7838).
pub(super) fn alt_svc(port: u16) -> HeaderValue {
    HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400")).unwrap_or(HeaderValue::from_static("clear"))
}

/// This worker's proxy for the configuration in force: rebuilt after a
/// reload, keeping the pool of every upstream whose settings did not change.
fn current_proxy(
    live: &Live,
    shared: &upstream::Shared,
    alt_svc: Option<&HeaderValue>,
    cached: &mut Option<Arc<Proxy>>,
) -> Option<Arc<Proxy>> {
    let active = live.load();
    if let Some(p) = cached.as_ref().filter(|p| p.active.generation == active.generation) {
        return Some(p.clone());
    }
    let mut upstreams = Vec::with_capacity(active.config.upstreams.len());
    for settings in &active.config.upstreams {
        let kept = cached.as_ref().and_then(|p| {
            let i = p.active.config.upstreams.iter().position(|u| u == settings)?;
            p.upstreams.get(i).cloned()
        });
        match kept.map_or_else(|| Upstream::new(settings, shared), Ok) {
            Ok(u) => upstreams.push(u),
            Err(e) => {
                // The roots were checked at start-up and on reload; keep what works if this still fails.
                tracing::error!(error = %e, "cannot build an upstream client for the new configuration");
                return cached.clone();
            }
        }
    }
    let p = Arc::new(Proxy {
        active,
        upstreams,
        metrics: live.metrics.clone(),
        grace_over: live.grace_over.clone(),
        alt_svc: alt_svc.cloned(),
    });
    *cached = Some(p.clone());
    Some(p)
}
