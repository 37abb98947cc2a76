//! A container's environment and command line, built the way the kubelet builds them
//! (`kubelet_pods.go` `makeEnvironmentVariables`): `envFrom`, then `env` with `$(VAR)`
//! expansion against what came before and the Service variables, `valueFrom` (fieldRef,
//! resourceFieldRef, configMapKeyRef, secretKeyRef), then the Service variables the pod
//! did not set; `command`/`args` are expanded against the result. Also the downward API
//! field values the `downwardAPI` volumes share. Pure code: the caller fetches the
//! ConfigMaps, Secrets and Services first.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ObjectFieldSelector, Pod, ResourceFieldSelector, Secret, Service,
};
use zeroscale::platform::local::template::expand;

/// Why an environment can't be built: the kubelet's `CreateContainerConfigError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EnvError(pub String);

/// What the kubelet knows about a pod when it starts a container.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub pod_ips: &'a [String],
    pub host_ip: &'a str,
    /// Used for `resourceFieldRef` on limits the container does not set.
    pub node_cpu_millis: f64,
    pub node_memory_bytes: f64,
}

/// The ConfigMaps and Secrets of the pod's namespace that it refers to; a name that is
/// missing here does not exist.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
}

/// The environment of `container`, in a stable order: `envFrom`, `env`, then Service
/// variables. Later duplicates replace the value of earlier ones in place.
pub fn container_env(
    container: &Container,
    facts: &PodFacts,
    sources: &Sources,
    services: &[&Service],
) -> Result<Vec<(String, String)>, EnvError> {
    let pod = facts.pod;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    let service_env = service_env(services, namespace, links);
    let mut env = EnvList::default();

    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        if let Some(r) = &from.config_map_ref {
            match sources.config_maps.get(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        let name = format!("{prefix}{k}");
                        if is_env_var_name(&name) {
                            env.set(name, v.clone());
                        }
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(EnvError(format!("configmap \"{}\" not found", r.name))),
            }
        }
        if let Some(r) = &from.secret_ref {
            match sources.secrets.get(&r.name) {
                Some(secret) => {
                    for (k, v) in secret.data.iter().flatten() {
                        let name = format!("{prefix}{k}");
                        if is_env_var_name(&name) {
                            env.set(name, String::from_utf8_lossy(&v.0).into_owned());
                        }
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(EnvError(format!("secret \"{}\" not found", r.name))),
            }
        }
    }

    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            let lookup = |name: &str| {
                env.get(name)
                    .or_else(|| service_env.iter().find(|(k, _)| k == name).map(|(_, v)| v))
                    .map(String::as_str)
            };
            expand(value, lookup)
        } else if let Some(from) = &var.value_from {
            if let Some(field) = &from.field_ref {
                field_ref(field, facts)?
            } else if let Some(resource) = &from.resource_field_ref {
                resource_value(resource, pod, Some(&container.name), facts)?
            } else if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional == Some(true);
                match sources.config_maps.get(&r.name) {
                    None if optional => continue,
                    None => return Err(EnvError(format!("configmap \"{}\" not found", r.name))),
                    Some(cm) => match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => {
                            return Err(EnvError(format!(
                                "couldn't find key {} in ConfigMap {namespace}/{}",
                                r.key, r.name
                            )));
                        }
                    },
                }
            } else if let Some(r) = &from.secret_key_ref {
                let optional = r.optional == Some(true);
                match sources.secrets.get(&r.name) {
                    None if optional => continue,
                    None => return Err(EnvError(format!("secret \"{}\" not found", r.name))),
                    Some(s) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                        Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(EnvError(format!(
                                "couldn't find key {} in Secret {namespace}/{}",
                                r.key, r.name
                            )));
                        }
                    },
                }
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        env.set(var.name.clone(), value);
    }

    for (k, v) in service_env {
        if env.get(&k).is_none() {
            env.set(k, v);
        }
    }
    Ok(env.0)
}

/// `command` + `args` with `$(VAR)` expanded against the container's environment.
pub fn command_line(container: &Container, env: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let command = container
        .command
        .iter()
        .flatten()
        .map(|w| expand(w, lookup))
        .collect();
    let args = container
        .args
        .iter()
        .flatten()
        .map(|w| expand(w, lookup))
        .collect();
    (command, args)
}

#[derive(Default)]
struct EnvList(Vec<(String, String)>);

impl EnvList {
    fn set(&mut self, name: String, value: String) {
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    fn get(&self, name: &str) -> Option<&String> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// The kubelet's (relaxed) environment variable name check: printable ASCII, no `=`,
/// not starting with a digit.
fn is_env_var_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'=')
}

/// The Service variables the kubelet injects (`pkg/kubelet/envvars`): the
/// `default/kubernetes` Service always, the pod namespace's Services when service links
/// are enabled. Services without a ClusterIP (headless, ExternalName) have none.
pub fn service_env(services: &[&Service], namespace: &str, links: bool) -> Vec<(String, String)> {
    let mut chosen: BTreeMap<&str, &Service> = BTreeMap::new();
    for svc in services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = svc.metadata.name.as_deref() else {
            continue;
        };
        if cluster_ip(svc).is_none() {
            continue;
        }
        if ns == "default" && name == "kubernetes" {
            chosen.entry(name).or_insert(svc);
        } else if ns == namespace && links {
            chosen.insert(name, svc);
        }
    }
    let mut out = Vec::new();
    for (name, svc) in chosen {
        let (Some(ip), Some(ports)) = (
            cluster_ip(svc),
            svc.spec.as_ref().and_then(|s| s.ports.as_ref()),
        ) else {
            continue;
        };
        let Some(first) = ports.first() else {
            continue;
        };
        let prefix = name.to_uppercase().replace('-', "_");
        out.push((format!("{prefix}_SERVICE_HOST"), ip.to_string()));
        out.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for p in ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((
                    format!(
                        "{prefix}_SERVICE_PORT_{}",
                        pn.to_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        for (i, p) in ports.iter().enumerate() {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            let lower = proto.to_lowercase();
            let host_port = if ip.contains(':') {
                format!("[{ip}]:{}", p.port)
            } else {
                format!("{ip}:{}", p.port)
            };
            if i == 0 {
                out.push((format!("{prefix}_PORT"), format!("{lower}://{host_port}")));
            }
            let pp = format!("{prefix}_PORT_{}_{}", p.port, proto.to_uppercase());
            out.push((pp.clone(), format!("{lower}://{host_port}")));
            out.push((format!("{pp}_PROTO"), lower.clone()));
            out.push((format!("{pp}_PORT"), p.port.to_string()));
            out.push((format!("{pp}_ADDR"), ip.to_string()));
        }
    }
    out
}

/// The ClusterIP of a Service that has one (not headless, not ExternalName).
pub fn cluster_ip(svc: &Service) -> Option<&str> {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty() && *ip != "None")
}

/// A `fieldRef` value (`podFieldSelectorRuntimeValue` and `ExtractFieldPathAsString`).
pub fn field_ref(field: &ObjectFieldSelector, facts: &PodFacts) -> Result<String, EnvError> {
    let pod = facts.pod;
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = field.field_path.as_str();
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" => facts.pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => facts.pod_ips.join(","),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_string(),
        _ => {
            let subscript = |prefix: &str| {
                path.strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix("['"))
                    .and_then(|rest| rest.strip_suffix("']"))
            };
            if let Some(key) = subscript("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = subscript("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(EnvError(format!("unsupported fieldPath: {path}")));
            }
        }
    };
    Ok(value)
}

/// `k="v"` lines sorted by key, the downward API's format for label and annotation maps.
fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `resourceFieldRef` value: the container's request or limit (a limit it does not set
/// is the node's allocatable, as the kubelet has it), divided by `divisor` and rounded up.
pub fn resource_value(
    sel: &ResourceFieldSelector,
    pod: &Pod,
    default_container: Option<&str>,
    facts: &PodFacts,
) -> Result<String, EnvError> {
    let name = sel
        .container_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(default_container)
        .ok_or_else(|| EnvError("resourceFieldRef needs containerName".into()))?;
    let container = pod
        .spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .find(|c| c.name == name)
        .ok_or_else(|| EnvError(format!("container {name} not found")))?;
    let resources = container.resources.as_ref();
    let get = |limits: bool, key: &str| {
        resources
            .and_then(|r| {
                if limits {
                    r.limits.as_ref()
                } else {
                    r.requests.as_ref()
                }
            })
            .and_then(|m| m.get(key))
            .and_then(|q| parse_quantity(&q.0))
    };
    let divisor = sel
        .divisor
        .as_ref()
        .and_then(|q| parse_quantity(&q.0))
        .filter(|d| *d > 0.0)
        .unwrap_or(1.0);
    let value = match sel.resource.as_str() {
        "limits.cpu" => get(true, "cpu").unwrap_or(facts.node_cpu_millis / 1000.0),
        "requests.cpu" => get(false, "cpu").unwrap_or(0.0),
        "limits.memory" => get(true, "memory").unwrap_or(facts.node_memory_bytes),
        "requests.memory" => get(false, "memory").unwrap_or(0.0),
        "limits.ephemeral-storage" => get(true, "ephemeral-storage").unwrap_or(0.0),
        "requests.ephemeral-storage" => get(false, "ephemeral-storage").unwrap_or(0.0),
        other => return Err(EnvError(format!("unsupported container resource: {other}"))),
    };
    let mut out = (value / divisor).ceil();
    // The kubelet never reports less than one core for limits.cpu with the default divisor.
    if sel.resource == "limits.cpu" && out < 1.0 {
        out = 1.0;
    }
    Ok(format!("{out:.0}"))
}

/// A Kubernetes quantity (`500m`, `2`, `128Mi`, `1G`, `1e3`) in base units.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                         "labels": {"app": "web", "tier": "front"},
                         "annotations": {"note": "hi"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "robot",
                     "containers": [{"name": "app", "image": "x",
                                     "resources": {"limits": {"memory": "128Mi"}, "requests": {"cpu": "250m"}}}]}
        }))
        .unwrap()
    }

    fn facts(pod: &Pod) -> PodFacts<'_> {
        PodFacts {
            pod,
            pod_ips: &IPS,
            host_ip: "10.244.0.1",
            node_cpu_millis: 8000.0,
            node_memory_bytes: 1e9,
        }
    }
    static IPS: [String; 0] = [];

    fn container(v: serde_json::Value) -> Container {
        let mut base = json!({"name": "app", "image": "x"});
        base.as_object_mut()
            .unwrap()
            .extend(v.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    fn service(ns: &str, name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": ports}
        }))
        .unwrap()
    }

    fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn values_expand_earlier_variables_and_leave_unknown_ones() {
        let pod = pod();
        let ips = vec!["10.244.0.7".to_string()];
        let facts = PodFacts {
            pod_ips: &ips,
            ..facts(&pod)
        };
        let c = container(json!({"env": [
            {"name": "PORT", "value": "8080"},
            {"name": "ADDR", "value": "$(MY_IP):$(PORT)"},
            {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "LATER", "value": "$(MY_IP) $(NOPE) $$(PORT)"},
        ]}));
        let env = container_env(&c, &facts, &Sources::default(), &[]).unwrap();
        assert_eq!(
            get(&env, "ADDR"),
            Some("$(MY_IP):8080"),
            "MY_IP comes later"
        );
        assert_eq!(get(&env, "LATER"), Some("10.244.0.7 $(NOPE) $(PORT)"));
    }

    #[test]
    fn field_refs() {
        let pod = pod();
        let ips = vec!["10.244.0.7".to_string()];
        let facts = PodFacts {
            pod_ips: &ips,
            ..facts(&pod)
        };
        let f = |path: &str| {
            field_ref(
                &ObjectFieldSelector {
                    field_path: path.into(),
                    api_version: None,
                },
                &facts,
            )
        };
        assert_eq!(f("metadata.name").unwrap(), "web-1");
        assert_eq!(f("metadata.namespace").unwrap(), "shop");
        assert_eq!(f("metadata.uid").unwrap(), "u-1");
        assert_eq!(f("metadata.labels['app']").unwrap(), "web");
        assert_eq!(f("metadata.labels['nope']").unwrap(), "");
        assert_eq!(f("metadata.annotations['note']").unwrap(), "hi");
        assert_eq!(f("metadata.labels").unwrap(), "app=\"web\"\ntier=\"front\"");
        assert_eq!(f("spec.nodeName").unwrap(), "n1");
        assert_eq!(f("spec.serviceAccountName").unwrap(), "robot");
        assert_eq!(f("status.podIP").unwrap(), "10.244.0.7");
        assert_eq!(f("status.podIPs").unwrap(), "10.244.0.7");
        assert_eq!(f("status.hostIP").unwrap(), "10.244.0.1");
        assert!(f("spec.bogus").is_err());
    }

    #[test]
    fn resource_field_refs_round_up_and_default_to_the_node() {
        let pod = pod();
        let facts = facts(&pod);
        let r = |res: &str, divisor: Option<&str>| {
            let sel: ResourceFieldSelector =
                serde_json::from_value(json!({"resource": res, "divisor": divisor})).unwrap();
            resource_value(&sel, &pod, Some("app"), &facts).unwrap()
        };
        assert_eq!(r("limits.memory", None), "134217728");
        assert_eq!(r("limits.memory", Some("1Mi")), "128");
        assert_eq!(r("requests.cpu", Some("1m")), "250");
        assert_eq!(r("requests.cpu", None), "1");
        assert_eq!(
            r("limits.cpu", None),
            "8",
            "no limit: the node's allocatable"
        );
    }

    #[test]
    fn config_maps_and_secrets() {
        let pod = pod();
        let facts = facts(&pod);
        let mut sources = Sources::default();
        sources.config_maps.insert(
            "cfg".into(),
            serde_json::from_value(json!({"metadata": {"name": "cfg"},
                "data": {"A": "1", "B": "2", "1BAD": "x"}}))
            .unwrap(),
        );
        sources.secrets.insert(
            "sec".into(),
            serde_json::from_value(json!({"metadata": {"name": "sec"},
                "data": {"PASSWORD": "aHVudGVyMg=="}}))
            .unwrap(),
        );
        let c = container(json!({
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
                        {"configMapRef": {"name": "gone", "optional": true}}],
            "env": [
                {"name": "A", "value": "from env"},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "PASSWORD"}}},
                {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "B"}}},
                {"name": "MAYBE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope", "optional": true}}},
                {"name": "REF", "value": "$(CFG_A)-$(PW)"},
            ]
        }));
        let env = container_env(&c, &facts, &sources, &[]).unwrap();
        assert_eq!(get(&env, "CFG_A"), Some("1"));
        assert_eq!(
            get(&env, "CFG_1BAD"),
            Some("x"),
            "the prefix makes it valid"
        );
        assert_eq!(get(&env, "A"), Some("from env"));
        assert_eq!(get(&env, "PW"), Some("hunter2"));
        assert_eq!(get(&env, "B"), Some("2"));
        assert_eq!(get(&env, "MAYBE"), None);
        assert_eq!(get(&env, "REF"), Some("1-hunter2"));

        let missing = container(json!({"env": [
            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope"}}}]}));
        assert_eq!(
            container_env(&missing, &facts, &sources, &[])
                .unwrap_err()
                .0,
            "couldn't find key nope in ConfigMap shop/cfg"
        );
        let missing = container(json!({"envFrom": [{"secretRef": {"name": "gone"}}]}));
        assert_eq!(
            container_env(&missing, &facts, &sources, &[])
                .unwrap_err()
                .0,
            "secret \"gone\" not found"
        );
    }

    #[test]
    fn service_variables_like_the_kubelet() {
        let kubernetes = service(
            "default",
            "kubernetes",
            "10.96.0.1",
            json!([{"name": "https", "port": 443}]),
        );
        let web = service(
            "shop",
            "web-api",
            "10.96.3.4",
            json!([{"name": "http", "port": 80}, {"name": "metrics", "port": 9090}]),
        );
        let headless = service("shop", "db", "None", json!([{"port": 5432}]));
        let other = service("elsewhere", "x", "10.96.9.9", json!([{"port": 1}]));
        let all = [&kubernetes, &web, &headless, &other];
        let env = service_env(&all, "shop", true);
        assert_eq!(get(&env, "KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get(&env, "KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get(&env, "KUBERNETES_SERVICE_PORT_HTTPS"), Some("443"));
        assert_eq!(get(&env, "KUBERNETES_PORT"), Some("tcp://10.96.0.1:443"));
        assert_eq!(get(&env, "WEB_API_SERVICE_HOST"), Some("10.96.3.4"));
        assert_eq!(get(&env, "WEB_API_SERVICE_PORT"), Some("80"));
        assert_eq!(get(&env, "WEB_API_SERVICE_PORT_METRICS"), Some("9090"));
        assert_eq!(
            get(&env, "WEB_API_PORT_9090_TCP"),
            Some("tcp://10.96.3.4:9090")
        );
        assert_eq!(get(&env, "WEB_API_PORT_9090_TCP_PROTO"), Some("tcp"));
        assert_eq!(get(&env, "WEB_API_PORT_9090_TCP_PORT"), Some("9090"));
        assert_eq!(get(&env, "WEB_API_PORT_9090_TCP_ADDR"), Some("10.96.3.4"));
        assert!(get(&env, "DB_SERVICE_HOST").is_none(), "headless");
        assert!(get(&env, "X_SERVICE_HOST").is_none(), "other namespace");

        let env = service_env(&all, "shop", false);
        assert_eq!(get(&env, "KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert!(get(&env, "WEB_API_SERVICE_HOST").is_none());
    }

    #[test]
    fn pod_variables_win_over_service_variables_and_commands_expand() {
        let pod = pod();
        let facts = facts(&pod);
        let kubernetes = service(
            "default",
            "kubernetes",
            "10.96.0.1",
            json!([{"name": "https", "port": 443}]),
        );
        let c = container(json!({
            "command": ["sh", "-c", "echo $(KUBERNETES_SERVICE_HOST) $(GREETING) $(NOPE)"],
            "args": ["$(KUBERNETES_SERVICE_PORT)"],
            "env": [{"name": "GREETING", "value": "hi $(KUBERNETES_SERVICE_HOST)"},
                    {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}]
        }));
        let env = container_env(&c, &facts, &Sources::default(), &[&kubernetes]).unwrap();
        assert_eq!(get(&env, "GREETING"), Some("hi 10.96.0.1"));
        assert_eq!(get(&env, "KUBERNETES_SERVICE_PORT"), Some("6443"));
        let (command, args) = command_line(&c, &env);
        assert_eq!(command[2], "echo 10.96.0.1 hi 10.96.0.1 $(NOPE)");
        assert_eq!(args, ["6443"]);
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Ki"), Some(1024.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("1.5Gi"), Some(1.5 * 1024f64.powi(3)));
        assert_eq!(parse_quantity("lots"), None);
    }
}
