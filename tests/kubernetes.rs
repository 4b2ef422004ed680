//! The Kubernetes base (deploy/kubernetes), rendered offline with
//! `kubectl kustomize` and parsed (PyYAML → JSON): the probes, ports, drain
//! timings and mounts must agree with the linkgate.toml it ships. Skipped,
//! with the reason, where kubectl or python3-yaml is missing; .ci/run
//! installs both.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

fn render() -> Option<Vec<Value>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
    let Ok(out) = Command::new("kubectl").args(["kustomize", dir]).output() else {
        eprintln!("SKIPPED: kubectl is not installed (apt-get install kubernetes-client)");
        return None;
    };
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    py.stdin
        .take()
        .expect("stdin")
        .write_all(&out.stdout)
        .expect("write yaml");
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
fn the_kubernetes_base_agrees_with_its_linkgate_config() {
    let Some(docs) = render() else { return };
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the config ConfigMap");
    let text = cm["data"]["linkgate.toml"]
        .as_str()
        .expect("linkgate.toml in the ConfigMap");
    let config: toml::Value = toml::from_str(text).expect("the shipped config is TOML");
    // The shipped config is valid as far as it can be without its certificates.
    let config_path = std::path::Path::new("/etc/linkgate/config/linkgate.toml");
    let admin = linkgate::config::Outline::parse(text, config_path)
        .expect("the shipped config parses")
        .admin_address()
        .expect("valid admin section")
        .expect("an admin listener for the probes");

    let deploy = kind(&docs, "Deployment", "linkgate");
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
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| m["mountPath"].as_str().expect("mountPath"))
        .collect();
    assert!(mounts.contains(&"/etc/linkgate/config"));
    for host in config["host"].as_array().expect("hosts") {
        for key in ["cert", "key"] {
            let file = config_path
                .parent()
                .expect("dir")
                .join(host[key].as_str().expect("path"));
            let folder = std::path::absolute(&file).expect("absolute");
            let normalised: std::path::PathBuf = folder.components().fold(std::path::PathBuf::new(), |mut p, c| {
                match c {
                    std::path::Component::ParentDir => {
                        p.pop();
                    }
                    other => p.push(other),
                }
                p
            });
            assert!(
                mounts
                    .iter()
                    .any(|m| normalised.starts_with(m) && *m != "/etc/linkgate/config"),
                "{} is not under a Secret mount: {mounts:?}",
                normalised.display()
            );
        }
    }

    // The public Service: an NLB with PROXY protocol v2 exactly when linkgate expects it.
    let svc = kind(&docs, "Service", "linkgate");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    let proxy_protocol =
        svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*";
    assert_eq!(
        proxy_protocol,
        config["listen"]["proxy_protocol"].as_bool().unwrap_or(false)
    );
    let svc_ports: Vec<(u64, &str)> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
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
        kind(&docs, "PodDisruptionBudget", "linkgate")["spec"]["maxUnavailable"],
        1
    );
    let hpa = kind(&docs, "HorizontalPodAutoscaler", "linkgate");
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    let admin_svc = kind(&docs, "Service", "linkgate-admin");
    assert_eq!(admin_svc["spec"]["ports"][0]["targetPort"], "admin");
    let sm = kind(&docs, "ServiceMonitor", "linkgate");
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        admin_svc["spec"]["ports"][0]["name"]
    );
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
}
