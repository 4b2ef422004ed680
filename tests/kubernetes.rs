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

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The overlays, and whether each one's balancer sends PROXY protocol.
const OVERLAYS: [(&str, bool); 3] = [("eks", true), ("gke", false), ("generic", false)];

fn render(overlay: &str) -> Option<Vec<Value>> {
    render_dir(
        &format!("{}/deploy/kubernetes/{overlay}", env!("CARGO_MANIFEST_DIR")),
        overlay,
    )
}

/// `overlays/<overlay>` with `components/http3` added, as an operator's
/// kustomization would (in a temp dir: kustomize takes only relative paths).
fn render_with_http3(overlay: &str) -> Option<Vec<Value>> {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let depth = dir.path().components().count() - 1;
    let up = "../".repeat(depth);
    let tree = format!(
        "{up}{}/deploy/kubernetes",
        env!("CARGO_MANIFEST_DIR").trim_start_matches('/')
    );
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {tree}/overlays/{overlay}\n\
             components:\n  - {tree}/components/http3\n"
        ),
    )
    .expect("write kustomization");
    render_dir(
        &dir.path().display().to_string(),
        &format!("{overlay} + components/http3"),
    )
}

fn render_dir(dir: &str, overlay: &str) -> Option<Vec<Value>> {
    let Ok(out) = Command::new("kubectl").args(["kustomize", dir]).output() else {
        eprintln!("SKIPPED: kubectl is not installed (apt-get install kubernetes-client)");
        return None;
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&out.stdout)
}

/// YAML documents as JSON values (PyYAML), or None (skipped) without PyYAML.
fn yaml_docs(yaml: &[u8]) -> Option<Vec<Value>> {
    let mut py = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin.take().expect("stdin").write_all(yaml).expect("write yaml");
    let json = py.wait_with_output().expect("python3");
    if !json.status.success() {
        eprintln!(
            "SKIPPED: python3 cannot parse YAML (apt-get install python3-yaml): {}",
            String::from_utf8_lossy(&json.stderr)
        );
        return None;
    }
    Some(serde_json::from_slice(&json.stdout).expect("rendered JSON"))
}

fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered base"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
}

fn secs(toml: &toml::Value, key: &str) -> Duration {
    let text = toml["shutdown"][key].as_str().expect("duration");
    linkgate::config::parse_duration(text, true).expect("valid duration")
}

#[test]
fn every_overlay_agrees_with_its_linkgate_config() {
    for (overlay, sends_proxy_protocol) in OVERLAYS {
        let Some(docs) = render(&format!("overlays/{overlay}")) else {
            return;
        };
        agrees(overlay, &docs, sends_proxy_protocol);
    }
}

/// The shipped config of a rendered overlay.
fn config_of(docs: &[Value]) -> (&str, toml::Value) {
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the config ConfigMap");
    let text = cm["data"]["linkgate.toml"]
        .as_str()
        .expect("linkgate.toml in the ConfigMap");
    (text, toml::from_str(text).expect("the shipped config is TOML"))
}

fn agrees(overlay: &str, docs: &[Value], sends_proxy_protocol: bool) {
    let (text, config) = config_of(docs);
    // The shipped config is valid as far as it can be without its certificates.
    let config_path = std::path::Path::new("/etc/linkgate/config/linkgate.toml");
    let admin = linkgate::config::Outline::parse(text, config_path)
        .expect("the shipped config parses")
        .admin_address()
        .expect("valid admin section")
        .expect("an admin listener for the probes");

    let deploy = kind(docs, "Deployment", "linkgate");
    let spec = &deploy["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(deploy["spec"]["replicas"], 3);
    let ports: Vec<(&str, u64)> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("name"),
                p["containerPort"].as_u64().expect("port"),
            )
        })
        .collect();
    let port = |name: &str| ports.iter().find(|p| p.0 == name).map(|p| p.1).expect("named port");
    assert_eq!(
        port("https"),
        port_of(config["listen"]["https"].as_str().expect("https"))
    );
    assert_eq!(port("http"), port_of(config["listen"]["http"].as_str().expect("http")));
    assert_eq!(port("admin"), u64::from(admin.port()));
    assert!(
        admin.ip().is_unspecified(),
        "the kubelet probes the pod IP: admin must not be loopback-only"
    );

    // Probes: readiness on /readyz, liveness on /healthz, both on the admin port.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");

    // Drain timings: the pod is marked unready well within drain_delay, and the
    // kubelet waits longer than drain_delay + grace_period before SIGKILL.
    let drain = secs(&config, "drain_delay");
    let grace = secs(&config, "grace_period");
    let probe = &c["readinessProbe"];
    let unready_after =
        probe["periodSeconds"].as_u64().expect("period") * probe["failureThreshold"].as_u64().expect("threshold");
    assert!(
        Duration::from_secs(unready_after) * 3 <= drain,
        "readiness notices the drain after {unready_after} s; drain_delay {drain:?} must leave time for the endpoint to go"
    );
    let termination = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("termination grace");
    assert!(
        Duration::from_secs(termination) > drain + grace,
        "terminationGracePeriodSeconds {termination} must exceed drain_delay + grace_period ({:?})",
        drain + grace
    );
    assert_eq!(deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);

    // Hardening and resources.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["securityContext"]["runAsUser"], 65532);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["limits"]["memory"].is_string());
    let zone_spread = spec["affinity"]["podAntiAffinity"].to_string();
    assert!(zone_spread.contains("topology.kubernetes.io/zone"), "{zone_spread}");

    // The config file and every host's certificate are where the config says.
    let env = c["env"].as_array().expect("env");
    assert!(env
        .iter()
        .any(|e| e["name"] == "LINKGATE_CONFIG" && e["value"] == config_path.to_str().expect("utf8")));
    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().expect("mountPath"),
                m["name"].as_str().expect("name"),
            )
        })
        .collect();
    assert!(mounts.iter().any(|m| m.0 == "/etc/linkgate/config"));
    let normalise = |relative: &str| -> std::path::PathBuf {
        let file = config_path.parent().expect("dir").join(relative);
        file.components().fold(std::path::PathBuf::new(), |mut p, c| {
            match c {
                std::path::Component::ParentDir => {
                    p.pop();
                }
                other => p.push(other),
            }
            p
        })
    };
    // certs_dir: one projected volume of every host's Secret, each at <host>/
    // holding tls.crt and tls.key, mounted where certs_dir says.
    let certs_dir = normalise(config["certs_dir"].as_str().expect("the base uses certs_dir"));
    let (_, volume) = mounts
        .iter()
        .find(|m| std::path::Path::new(m.0) == certs_dir)
        .unwrap_or_else(|| panic!("certs_dir {} is not a mount: {mounts:?}", certs_dir.display()));
    let volumes = spec["volumes"].as_array().expect("volumes");
    let projected = &volumes.iter().find(|v| v["name"] == *volume).expect("the certs volume")["projected"];
    let paths: Vec<&str> = projected["sources"]
        .as_array()
        .expect("projected sources")
        .iter()
        .flat_map(|src| src["secret"]["items"].as_array().into_iter().flatten())
        .map(|item| item["path"].as_str().expect("path"))
        .collect();
    for host in config["host"].as_array().expect("hosts") {
        let name = host["name"].as_str().expect("name");
        assert!(
            host.get("cert").is_none() && host.get("key").is_none(),
            "{name}: takes its pair from certs_dir"
        );
        for file in ["tls.crt", "tls.key"] {
            let want = format!("{name}/{file}");
            assert!(paths.contains(&want.as_str()), "{want} is not projected: {paths:?}");
        }
    }

    // The public Service: PROXY protocol v2 from the balancer exactly when linkgate expects it.
    let svc = kind(docs, "Service", "linkgate");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(
        svc["spec"]["externalTrafficPolicy"], "Local",
        "{overlay}: the client address must survive"
    );
    let annotations = &svc["metadata"]["annotations"];
    let aws = |key: &str| &annotations[format!("service.beta.kubernetes.io/aws-load-balancer-{key}")];
    assert_eq!(aws("proxy-protocol") == "*", sends_proxy_protocol, "{overlay}");
    assert_eq!(
        config["listen"]["proxy_protocol"].as_bool().unwrap_or(false),
        sends_proxy_protocol,
        "{overlay}: linkgate.toml's proxy_protocol must match what the balancer sends"
    );
    if overlay == "eks" {
        // The NLB (AWS Load Balancer Controller): pod targets, /readyz on the
        // admin port, and a draining pod marked unhealthy within drain_delay.
        assert_eq!(aws("type"), "external");
        assert_eq!(aws("nlb-target-type"), "ip");
        assert_eq!(aws("healthcheck-path"), "/readyz");
        assert_eq!(aws("healthcheck-port"), admin.port().to_string().as_str());
        let number = |key: &str| aws(key).as_str().and_then(|v| v.parse::<u64>().ok()).expect(key);
        let noticed = Duration::from_secs(number("healthcheck-interval") * number("healthcheck-unhealthy-threshold"));
        assert!(
            noticed < drain,
            "the NLB notices a draining pod after {noticed:?}; drain_delay is {drain:?}"
        );
        let ns = kind(docs, "Namespace", "linkgate");
        assert_eq!(
            ns["metadata"]["labels"]["elbv2.k8s.aws/pod-readiness-gate-inject"],
            "enabled"
        );
    } else {
        assert!(
            annotations
                .as_object()
                .is_none_or(|a| a.keys().all(|k| !k.contains("aws-load-balancer"))),
            "{overlay}: no AWS annotations"
        );
    }
    if overlay == "gke" {
        assert_eq!(annotations["cloud.google.com/l4-rbs"], "enabled");
        // GKE's node health check (ingress-gce's L4 defaults, restored if
        // changed): every 8 s, unhealthy after 3 failures.
        let noticed = Duration::from_secs(8 * 3);
        assert!(
            noticed + Duration::from_secs(unready_after) < drain,
            "GKE notices a draining pod after {noticed:?} plus the readiness probe; drain_delay is {drain:?}"
        );
    }
    let svc_ports: Vec<(u64, &str)> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter(|p| p["protocol"] != "UDP")
        .map(|p| {
            (
                p["port"].as_u64().expect("port"),
                p["targetPort"].as_str().expect("targetPort"),
            )
        })
        .collect();
    assert_eq!(svc_ports, [(443, "https"), (80, "http")], "admin is never public");

    // Disruption budget, autoscaler, metrics.
    assert_eq!(
        kind(docs, "PodDisruptionBudget", "linkgate")["spec"]["maxUnavailable"],
        1
    );
    let hpa = kind(docs, "HorizontalPodAutoscaler", "linkgate");
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    let admin_svc = kind(docs, "Service", "linkgate-admin");
    assert_eq!(admin_svc["spec"]["ports"][0]["targetPort"], "admin");
    let sm = kind(docs, "ServiceMonitor", "linkgate");
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        admin_svc["spec"]["ports"][0]["name"]
    );
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
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
