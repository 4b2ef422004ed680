//! The Kubernetes overlays (deploy/kubernetes/overlays/{eks,gke,generic}
//! over deploy/kubernetes/base), each rendered offline with `kubectl
//! kustomize` and parsed (PyYAML → JSON): the probes, ports, drain timings
//! and mounts must agree with the linkgate.toml it ships, and linkgate must
//! expect a PROXY header exactly when the overlay's balancer sends one. The
//! opt-in HTTP/3 component (deploy/kubernetes/components/http3), rendered
//! over each overlay, adds the UDP port to the container and the Service
//! and `listen.http3` to the config, and turns PROXY protocol off. Skipped,
//! with the reason, where kubectl or python3-yaml is missing; .ci/run
//! installs both.

mod common;

use common::kustomize::*;
use serde_json::Value;

#[test]
fn every_overlay_agrees_with_its_linkgate_config() {
    for (overlay, sends_proxy_protocol) in OVERLAYS {
        let Some(docs) = render(&format!("overlays/{overlay}")) else {
            return;
        };
        agrees(overlay, &docs, sends_proxy_protocol);
    }
}

/// The EKS overlay ships its own linkgate.toml (kustomize cannot edit a
/// TOML file): it must stay the base's but for the PROXY protocol lines.
#[test]
fn the_eks_config_is_the_base_config_with_proxy_protocol() {
    let (Some(base), Some(eks)) = (render("base"), render("overlays/eks")) else {
        return;
    };
    let strip = |mut config: toml::Value| {
        let listen = config["listen"].as_table_mut().expect("[listen]");
        listen.remove("proxy_protocol");
        listen.remove("trusted_proxies");
        config
    };
    let (_, base_config) = config_of(&base);
    let (_, eks_config) = config_of(&eks);
    assert_eq!(eks_config["listen"]["proxy_protocol"].as_bool(), Some(true));
    assert!(eks_config["listen"]["trusted_proxies"].is_array());
    assert_eq!(strip(eks_config), strip(base_config));
}

/// The cert-manager examples: a DNS-01 issuer (HTTP-01 cannot reach a
/// solver through linkgate), and the Certificate writes the Secret the
/// Deployment mounts (a source of its projected certificate volume).
#[test]
fn the_certificate_example_uses_the_dns01_issuer_and_the_mounted_secret() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/examples");
    let read = |name: &str| std::fs::read(format!("{dir}/{name}")).expect("example");
    let (Some(issuer), Some(cert), Some(base)) = (
        yaml_docs(&read("clusterissuer-dns01.yaml")),
        yaml_docs(&read("certificate.yaml")),
        render("base"),
    ) else {
        return;
    };
    let issuer = &issuer[0];
    assert_eq!(issuer["kind"], "ClusterIssuer");
    let solvers = issuer["spec"]["acme"]["solvers"].as_array().expect("solvers");
    assert!(
        solvers
            .iter()
            .all(|s| s.get("dns01").is_some() && s.get("http01").is_none()),
        "{solvers:?}"
    );
    let cert = &cert[0];
    assert_eq!(cert["spec"]["issuerRef"]["name"], issuer["metadata"]["name"]);
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    let deploy = kind(&base, "Deployment", "linkgate");
    let secrets: Vec<&Value> = deploy["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .flat_map(|v| v["projected"]["sources"].as_array().into_iter().flatten())
        .filter_map(|src| src.get("secret").map(|s| &s["name"]))
        .collect();
    assert!(secrets.contains(&&cert["spec"]["secretName"]), "{secrets:?}");
}

/// The HTTP/3 component over every overlay: UDP on the container's https
/// port number and on the Service's 443, `listen.http3` there with 443
/// advertised (what clients reach through the Service), no PROXY protocol
/// anywhere (none exists for UDP), and on EKS client addresses kept by
/// every target group instead. Everything else is as the overlay says
/// (`agrees`), and the config is the base's but for the HTTP/3 lines.
#[test]
fn the_http3_component_adds_the_udp_port_and_listen_http3_to_every_overlay() {
    let Some(base) = render("base") else {
        return;
    };
    let (_, base_config) = config_of(&base);
    for (overlay, _) in OVERLAYS {
        let Some(docs) = render_with_http3(overlay) else {
            return;
        };
        agrees(overlay, &docs, false);
        let (text, config) = config_of(&docs);
        let listen = &config["listen"];
        let outline =
            linkgate::config::Outline::parse(text, std::path::Path::new("/etc/linkgate/config/linkgate.toml"))
                .expect("the shipped config parses");
        assert_eq!(outline.http3_port().expect("listen.http3"), Some(443), "{overlay}");

        let deploy = kind(&docs, "Deployment", "linkgate");
        let ports = deploy["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .expect("ports");
        let named = |name: &str| ports.iter().find(|p| p["name"] == name).expect("named port");
        let udp = named("http3");
        assert_eq!(udp["protocol"], "UDP", "{overlay}");
        let http3 = port_of(listen["http3"].as_str().expect("listen.http3"));
        assert_eq!(udp["containerPort"].as_u64(), Some(http3), "{overlay}");
        assert_eq!(
            named("https")["containerPort"].as_u64(),
            Some(http3),
            "same port number as https"
        );

        let svc = kind(&docs, "Service", "linkgate");
        let svc_udp: Vec<&Value> = svc["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .filter(|p| p["protocol"] == "UDP")
            .collect();
        assert_eq!(svc_udp.len(), 1, "{overlay}: {svc_udp:?}");
        assert_eq!(svc_udp[0]["port"], 443, "{overlay}: the https port number, over UDP");
        assert_eq!(svc_udp[0]["targetPort"], "http3", "{overlay}");
        assert_eq!(
            listen["http3_advertise_port"].as_integer(),
            Some(443),
            "{overlay}: Alt-Svc must name the Service's port"
        );

        let annotations = &svc["metadata"]["annotations"];
        let aws = |key: &str| &annotations[format!("service.beta.kubernetes.io/aws-load-balancer-{key}")];
        assert!(aws("proxy-protocol").is_null(), "{overlay}: no PROXY protocol with UDP");
        if overlay == "eks" {
            let attributes = aws("target-group-attributes")
                .as_str()
                .expect("target group attributes");
            assert!(attributes.contains("preserve_client_ip.enabled=true"), "{attributes}");
        }

        let mut stripped = config.clone();
        let table = stripped["listen"].as_table_mut().expect("[listen]");
        table.remove("http3");
        table.remove("http3_advertise_port");
        assert_eq!(
            stripped, base_config,
            "{overlay}: the base's config but for the HTTP/3 lines"
        );
    }
}
