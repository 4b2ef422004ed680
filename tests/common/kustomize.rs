//! The Kubernetes manifests as a test reads them: an overlay (or an overlay
//! with the HTTP/3 component) rendered offline with `kubectl kustomize` and
//! parsed (PyYAML → JSON), the objects and the linkgate.toml it ships, and
//! [`agrees`]: what every overlay must satisfy (probes, ports, drain
//! timings, mounts, PROXY protocol as its balancer sends it). `None` (the
//! test skips, saying why) where kubectl or python3-yaml is missing.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The overlays, and whether each one's balancer sends PROXY protocol.
pub const OVERLAYS: [(&str, bool); 3] = [("eks", true), ("gke", false), ("generic", false)];

pub fn render(overlay: &str) -> Option<Vec<Value>> {
    render_dir(
        &format!("{}/deploy/kubernetes/{overlay}", env!("CARGO_MANIFEST_DIR")),
        overlay,
    )
}

/// `overlays/<overlay>` with `components/http3` added, as an operator's
/// kustomization would (in a temp dir: kustomize takes only relative paths).
pub fn render_with_http3(overlay: &str) -> Option<Vec<Value>> {
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

pub fn render_dir(dir: &str, overlay: &str) -> Option<Vec<Value>> {
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
pub fn yaml_docs(yaml: &[u8]) -> Option<Vec<Value>> {
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

pub fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered base"))
}

pub fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
}

pub fn secs(toml: &toml::Value, key: &str) -> Duration {
    let text = toml["shutdown"][key].as_str().expect("duration");
    linkgate::config::parse_duration(text, true).expect("valid duration")
}

/// The shipped config of a rendered overlay.
pub fn config_of(docs: &[Value]) -> (&str, toml::Value) {
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the config ConfigMap");
    let text = cm["data"]["linkgate.toml"]
        .as_str()
        .expect("linkgate.toml in the ConfigMap");
    (text, toml::from_str(text).expect("the shipped config is TOML"))
}

pub fn agrees(overlay: &str, docs: &[Value], sends_proxy_protocol: bool) {
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
