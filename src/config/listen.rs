//! `[listen]`: the addresses linkgate binds (https, plain http, HTTP/3
//! over UDP), the PROXY protocol and the proxies trusted to send it, and
//! the rules between them, each with its own unit test.

use std::net::{IpAddr, SocketAddr};

use super::build::parse_addr;
use super::raw::RawListen;
use super::units::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    /// Expect a PROXY protocol v1 or v2 header on every connection.
    pub proxy_protocol: bool,
    /// Peers allowed to send PROXY headers, and whose X-Forwarded-For/-Proto are kept.
    pub trusted_proxies: Vec<IpNet>,
    /// `listen.http3`: HTTP/3 over QUIC on this UDP address.
    pub http3: Option<Http3>,
}

/// The HTTP/3 listener: where it binds and which port `Alt-Svc` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http3 {
    pub addr: SocketAddr,
    /// `listen.http3_advertise_port`: the port clients reach it on, when a
    /// balancer's public port differs from the bound one; `None`: the bound port.
    pub advertise_port: Option<u16>,
}

impl Listen {
    /// True when `ip` is one of the trusted proxies.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(ip))
    }
}

/// Checks `[listen]`. The error names the key at fault.
pub(super) fn build_listen(raw: &RawListen) -> Result<Listen, (&'static str, String)> {
    let addr = |key: &'static str, s: &str| parse_addr(s).map_err(|m| (key, m));
    let http3 = match &raw.http3 {
        Some(s) => Some(Http3 {
            addr: addr("listen.http3", s)?,
            advertise_port: raw.http3_advertise_port,
        }),
        None => None,
    };
    let listen = Listen {
        https: addr("listen.https", &raw.https)?,
        http: raw.http.as_deref().map(|s| addr("listen.http", s)).transpose()?,
        proxy_protocol: raw.proxy_protocol,
        trusted_proxies: raw
            .trusted_proxies
            .iter()
            .map(|s| IpNet::parse(s))
            .collect::<Result<_, _>>()
            .map_err(|m| ("listen.trusted_proxies", m))?,
        http3,
    };
    if listen.proxy_protocol && listen.trusted_proxies.is_empty() {
        return Err((
            "listen.trusted_proxies",
            "proxy_protocol = true needs the load balancers' addresses here: PROXY headers are accepted only from them"
                .into(),
        ));
    }
    if listen.http == Some(listen.https) && listen.https.port() != 0 {
        return Err(("listen.http", "must differ from listen.https".into()));
    }
    match &listen.http3 {
        None if raw.http3_advertise_port.is_some() => {
            return Err((
                "listen.http3_advertise_port",
                "needs listen.http3 (the UDP address HTTP/3 is served on)".into(),
            ));
        }
        Some(_) if raw.http3_advertise_port == Some(0) => {
            return Err((
                "listen.http3_advertise_port",
                "must be a port from 1 to 65535 (leave it out to advertise the bound port)".into(),
            ));
        }
        Some(_) if listen.proxy_protocol && !raw.http3_balancer_preserves_client_address => {
            return Err(("listen.http3", PROXY_PROTOCOL_OVER_UDP.into()));
        }
        _ => {}
    }
    Ok(listen)
}

/// Why `http3` with `proxy_protocol = true` is refused, and how to confirm it is safe.
const PROXY_PROTOCOL_OVER_UDP: &str =
    "cannot be used with proxy_protocol = true unless the balancer keeps client addresses for UDP: \
     there is no PROXY protocol for UDP, so each HTTP/3 client's address would be the balancer's \
     (per-address limits, X-Forwarded-For, the provider's click data); pass UDP through on the same port with the \
     client's address preserved (AWS NLB UDP listener with client IP preservation, GKE externalTrafficPolicy: Local), \
     then say so: set listen.http3_balancer_preserves_client_address = true";

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawListen {
        toml::from_str(text).expect("raw listen")
    }

    fn build(text: &str) -> Result<Listen, (&'static str, String)> {
        build_listen(&raw(&format!("https = \"127.0.0.1:443\"\n{text}")))
    }

    #[test]
    fn http3_is_read_with_its_advertised_port() {
        let listen = build("http3 = \"127.0.0.1:443\"\nhttp3_advertise_port = 8443\n").expect("valid");
        let http3 = listen.http3.expect("http3");
        assert_eq!(http3.addr, "127.0.0.1:443".parse().expect("addr"));
        assert_eq!(http3.advertise_port, Some(8443));
        assert_eq!(build("").expect("valid").http3, None);
    }

    #[test]
    fn a_bad_http3_address_names_its_key() {
        let (key, message) = build("http3 = \"443\"\n").expect_err("refused");
        assert_eq!(key, "listen.http3");
        assert!(message.contains("IP:PORT"), "{message}");
    }

    #[test]
    fn an_advertised_port_needs_http3_and_a_port() {
        let (key, message) = build("http3_advertise_port = 443\n").expect_err("refused");
        assert_eq!(key, "listen.http3_advertise_port");
        assert!(message.contains("needs listen.http3"), "{message}");
        let (key, _) = build("http3 = \"127.0.0.1:443\"\nhttp3_advertise_port = 0\n").expect_err("refused");
        assert_eq!(key, "listen.http3_advertise_port");
    }

    #[test]
    fn http3_with_proxy_protocol_needs_the_balancer_confirmed() {
        let proxied = "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\nhttp3 = \"127.0.0.1:443\"\n";
        let (key, message) = build(proxied).expect_err("refused");
        assert_eq!(key, "listen.http3");
        assert!(message.contains("no PROXY protocol for UDP"), "{message}");
        assert!(message.contains("the balancer's"), "{message}");
        assert!(
            message.contains("set listen.http3_balancer_preserves_client_address = true"),
            "{message}"
        );
        let confirmed = format!("{proxied}http3_balancer_preserves_client_address = true\n");
        assert!(build(&confirmed).expect("confirmed").http3.is_some());
    }
}
