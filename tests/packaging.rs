//! The install manifests, checked against the Kubernetes API types and against the code.
//!
//! Every document the Helm chart renders (default and non-default values, through
//! `tests/packaging/render.py`) and every document of `kubectl kustomize config/...`
//! must decode into its k8s-openapi type (or `zeroscale::api::Function`) and serialise
//! back to the same thing, so a misspelt field fails here rather than being dropped by
//! the API server. On top: the RBAC grants exactly what `zeroscale::operator::rbac`
//! says the code calls, the pods run as the restricted Pod Security Standard asks, and
//! the components are wired to each other (Service ports, --activator-service,
//! --defaults). A missing tool (python3 with the Helm SDK, kubectl) fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroscale::api::{Defaults, Function, FunctionConfig};
use zeroscale::operator::rbac::{ACTIVATOR_RULES, OPERATOR_RULES, Rule, Scope};

const RELEASE_NAMESPACE: &str = "zeroscale-system";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool and returns its stdout; panics with what to install when it is missing.
fn run(program: &str, args: &[&str], hint: &str) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}. {hint}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}\n{hint}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// One install: its documents and what it was asked to watch.
struct Install {
    what: String,
    docs: Vec<Value>,
    /// Empty: every namespace.
    watch_namespaces: Vec<String>,
}

fn values_files() -> Vec<PathBuf> {
    let dir = root().join("tests/packaging/values");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no values files in {}", dir.display());
    files
}

fn chart_install(values: &Path) -> Install {
    let relative = values.strip_prefix(root()).unwrap_or(values);
    let path = relative.to_str().expect("UTF-8 path");
    let yaml = run(
        "python3",
        &["tests/packaging/render.py", path],
        "The chart is rendered with Helm's SDK: python3 -m pip install -r tests/packaging/requirements.txt",
    );
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(values).expect("values"))
        .expect("values file is YAML");
    let watch_namespaces = values["watchNamespaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n.as_str().expect("namespace").to_owned())
                .collect()
        })
        .unwrap_or_default();
    Install {
        what: format!("chart with {path}"),
        docs: documents(&yaml),
        watch_namespaces,
    }
}

fn kustomize(dir: &str) -> Vec<Value> {
    documents(&run(
        "kubectl",
        &["kustomize", dir],
        "config/ is rendered with kubectl's built-in kustomize: install kubectl",
    ))
}

fn installs() -> Vec<Install> {
    let mut all: Vec<Install> = values_files().iter().map(|v| chart_install(v)).collect();
    all.push(Install {
        what: "kubectl kustomize config/default".into(),
        docs: kustomize("config/default"),
        watch_namespaces: vec![],
    });
    all
}

// ---------------------------------------------------------------------------------
// Every document is its Kubernetes type, with no field the type does not know.

/// Paths where `input` has something `typed` (the input decoded and encoded again)
/// does not: misspelt or misplaced fields, which the API server would drop silently.
fn lost_fields(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => {
            for (key, value) in i {
                let here = format!("{path}.{key}");
                match t.get(key) {
                    Some(v) => lost_fields(value, v, &here, out),
                    None if value.is_null() => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(i), Value::Array(t)) if i.len() == t.len() => {
            for (n, (a, b)) in i.iter().zip(t).enumerate() {
                lost_fields(a, b, &format!("{path}[{n}]"), out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn decode<K>(doc: &Value) -> Result<K, String>
where
    K: DeserializeOwned + Serialize,
{
    let typed: K = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "fields the type does not know: {}",
            lost.join(", ")
        ))
    }
}

fn decode_typed<K>(doc: &Value) -> Result<(), String>
where
    K: k8s_openapi::Resource + DeserializeOwned + Serialize,
{
    decode::<K>(doc).map(|_| ())
}

/// Required shape of a prometheus-operator ServiceMonitor (no Rust type for it here).
fn check_service_monitor(doc: &Value) -> Result<(), String> {
    let spec = &doc["spec"];
    if !spec["selector"].is_object() {
        return Err("spec.selector is required".into());
    }
    let endpoints = spec["endpoints"]
        .as_array()
        .filter(|e| !e.is_empty())
        .ok_or("spec.endpoints must list at least one endpoint")?;
    for e in endpoints {
        let known = ["port", "path", "interval", "scrapeTimeout", "scheme"];
        let fields = e.as_object().ok_or("an endpoint is an object")?;
        if let Some(bad) = fields.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("unexpected endpoint field {bad}"));
        }
        if !e["port"].is_string() {
            return Err("every endpoint names its Service port".into());
        }
    }
    Ok(())
}

fn check_document(doc: &Value) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("apps/v1", "Deployment") => decode_typed::<Deployment>(doc),
        ("v1", "Service") => decode_typed::<Service>(doc),
        ("v1", "ServiceAccount") => decode_typed::<ServiceAccount>(doc),
        ("v1", "ConfigMap") => decode_typed::<ConfigMap>(doc),
        ("v1", "Namespace") => decode_typed::<Namespace>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => decode_typed::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            decode_typed::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => decode_typed::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => decode_typed::<RoleBinding>(doc),
        ("networking.k8s.io/v1", "NetworkPolicy") => decode_typed::<NetworkPolicy>(doc),
        ("policy/v1", "PodDisruptionBudget") => decode_typed::<PodDisruptionBudget>(doc),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => {
            decode_typed::<HorizontalPodAutoscaler>(doc)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            decode_typed::<CustomResourceDefinition>(doc)
        }
        ("zeroscale.dev/v1alpha1", "Function") => {
            let function: Function = decode(doc)?;
            if let Some(template) = &function.spec.template {
                template.parse().map_err(|e| e.to_string())?;
            }
            FunctionConfig::resolve(&function.spec, &Defaults::default())
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor") => check_service_monitor(doc),
        _ => Err(format!("unexpected {api_version} {kind}")),
    }
}

fn name_of(doc: &Value) -> String {
    format!(
        "{} {}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["namespace"].as_str().unwrap_or(""),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

#[test]
fn every_document_is_its_kubernetes_type() {
    let mut all = installs();
    all.push(Install {
        what: "kubectl kustomize config/samples".into(),
        docs: kustomize("config/samples"),
        watch_namespaces: vec![],
    });
    let mut failures = Vec::new();
    for install in &all {
        assert!(
            !install.docs.is_empty(),
            "{} rendered nothing",
            install.what
        );
        for doc in &install.docs {
            if let Err(e) = check_document(doc) {
                failures.push(format!("{}: {}: {e}", install.what, name_of(doc)));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn the_samples_are_functions_that_validate() {
    let docs = kustomize("config/samples");
    assert!(!docs.is_empty());
    for doc in &docs {
        check_document(doc).unwrap_or_else(|e| panic!("{}: {e}", name_of(doc)));
        if doc["kind"] == "Function" {
            // A Function scaling an existing workload comes with that workload.
            if let Some(target) = doc["spec"]["scaleTargetRef"].as_object() {
                assert!(
                    docs.iter().any(|d| d["kind"] == target["kind"]
                        && d["metadata"]["name"] == target["name"]
                        && d["metadata"]["namespace"] == doc["metadata"]["namespace"]),
                    "{}: its scaleTargetRef is not among the samples",
                    name_of(doc)
                );
            }
        } else {
            // Only the ordinary Deployment and Service of examples/existing-deployment.yaml.
            assert!(
                matches!(doc["kind"].as_str(), Some("Deployment" | "Service")),
                "{}",
                name_of(doc)
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Typed views of one install.

fn typed<K: DeserializeOwned>(docs: &[Value], kind: &str) -> Vec<K> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| {
            serde_json::from_value(d.clone())
                .expect("checked by every_document_is_its_kubernetes_type")
        })
        .collect()
}

fn pod_spec(deployment: &Deployment) -> &PodSpec {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod spec")
}

/// The Deployment running `zeroscale <component>` (its args start with the subcommand).
fn component<'a>(
    deployments: &'a [Deployment],
    component: &str,
) -> (&'a Deployment, &'a Container) {
    let mut found = deployments.iter().filter_map(|d| {
        pod_spec(d)
            .containers
            .iter()
            .find(|c| {
                c.args
                    .as_ref()
                    .and_then(|a| a.first())
                    .is_some_and(|a| a == component)
            })
            .map(|c| (d, c))
    });
    let one = found
        .next()
        .unwrap_or_else(|| panic!("no Deployment runs `zeroscale {component}`"));
    assert!(
        found.next().is_none(),
        "two Deployments run `zeroscale {component}`"
    );
    one
}

fn arg<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    container
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(&prefix))
}

fn namespace_of(deployment: &Deployment) -> &str {
    deployment
        .metadata
        .namespace
        .as_deref()
        .expect("namespaced")
}

/// `$(VAR)` references in args, expanded the way the kubelet does from downward-API env.
fn expand(value: &str, container: &Container, pod_namespace: &str, pod_name: &str) -> String {
    let mut out = value.to_owned();
    for env in container.env.iter().flatten() {
        let field = env
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        let resolved = match (field, &env.value) {
            (Some("metadata.namespace"), _) => pod_namespace.to_owned(),
            (Some("metadata.name"), _) => pod_name.to_owned(),
            (None, Some(v)) => v.clone(),
            _ => continue,
        };
        out = out.replace(&format!("$({})", env.name), &resolved);
    }
    out
}

fn selects(service: &Service, deployment: &Deployment) -> bool {
    let selector = service.spec.as_ref().and_then(|s| s.selector.as_ref());
    let labels = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.as_ref());
    match (selector, labels) {
        (Some(sel), Some(labels)) => {
            !sel.is_empty()
                && service.metadata.namespace == deployment.metadata.namespace
                && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------
// RBAC: exactly what the code calls.

/// One permission: a verb on a resource of a group, cluster-wide (`None`) or in a namespace.
type Grant = (Option<String>, String, String, String);

fn expected_grants(rules: &[Rule], watched: &[String]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in rules {
        let places: Vec<Option<String>> = match rule.scope {
            Scope::Watched if watched.is_empty() => vec![None],
            Scope::Watched => watched.iter().cloned().map(Some).collect(),
            Scope::OwnNamespace => vec![Some(RELEASE_NAMESPACE.to_owned())],
        };
        for place in places {
            for resource in rule.resources {
                for verb in rule.verbs() {
                    out.insert((
                        place.clone(),
                        rule.api_group.to_owned(),
                        (*resource).to_owned(),
                        (*verb).to_owned(),
                    ));
                }
            }
        }
    }
    out
}

fn grants_of(rules: &[PolicyRule], place: &Option<String>, what: &str) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{what}: resourceNames/nonResourceURLs are not used by zeroscale"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for part in [group, resource, verb] {
                        assert!(!part.contains('*'), "{what}: wildcard {part}");
                    }
                    out.insert((place.clone(), group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

struct Rbac {
    cluster_roles: BTreeMap<String, ClusterRole>,
    roles: BTreeMap<(String, String), Role>,
    cluster_bindings: Vec<ClusterRoleBinding>,
    bindings: Vec<RoleBinding>,
}

impl Rbac {
    fn of(docs: &[Value]) -> Self {
        Rbac {
            cluster_roles: typed::<ClusterRole>(docs, "ClusterRole")
                .into_iter()
                .map(|r| (r.metadata.name.clone().expect("named"), r))
                .collect(),
            roles: typed::<Role>(docs, "Role")
                .into_iter()
                .map(|r| {
                    let key = (
                        r.metadata.namespace.clone().expect("namespaced"),
                        r.metadata.name.clone().expect("named"),
                    );
                    (key, r)
                })
                .collect(),
            cluster_bindings: typed(docs, "ClusterRoleBinding"),
            bindings: typed(docs, "RoleBinding"),
        }
    }

    /// Everything a ServiceAccount may do through the rendered bindings.
    fn grants(&self, namespace: &str, account: &str) -> BTreeSet<Grant> {
        let is_subject = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == account
                    && s.namespace.as_deref() == Some(namespace)
            })
        };
        let mut out = BTreeSet::new();
        for binding in self
            .cluster_bindings
            .iter()
            .filter(|b| is_subject(&b.subjects))
        {
            let role = &binding.role_ref;
            assert_eq!(role.kind, "ClusterRole");
            let rules = &self.cluster_roles[&role.name].rules;
            out.extend(grants_of(
                rules.as_deref().unwrap_or_default(),
                &None,
                &role.name,
            ));
        }
        for binding in self.bindings.iter().filter(|b| is_subject(&b.subjects)) {
            let place = binding.metadata.namespace.clone();
            let role = &binding.role_ref;
            let rules = match role.kind.as_str() {
                "Role" => {
                    let key = (place.clone().expect("namespaced"), role.name.clone());
                    let role = self
                        .roles
                        .get(&key)
                        .unwrap_or_else(|| panic!("RoleBinding to missing Role {key:?}"));
                    role.rules.clone()
                }
                _ => self.cluster_roles[&role.name].rules.clone(),
            };
            out.extend(grants_of(
                rules.as_deref().unwrap_or_default(),
                &place,
                &role.name,
            ));
        }
        out
    }
}

fn service_account(deployment: &Deployment) -> (String, String) {
    (
        namespace_of(deployment).to_owned(),
        pod_spec(deployment)
            .service_account_name
            .clone()
            .expect("a dedicated ServiceAccount, not `default`"),
    )
}

#[test]
fn rbac_grants_exactly_what_the_code_calls() {
    for install in installs() {
        let deployments: Vec<Deployment> = typed(&install.docs, "Deployment");
        let rbac = Rbac::of(&install.docs);
        let mut bound = BTreeSet::new();
        for (name, rules) in [("operator", OPERATOR_RULES), ("activator", ACTIVATOR_RULES)] {
            let (deployment, _) = component(&deployments, name);
            let (namespace, account) = service_account(deployment);
            let granted = rbac.grants(&namespace, &account);
            let expected = expected_grants(rules, &install.watch_namespaces);
            let missing: Vec<_> = expected.difference(&granted).collect();
            let extra: Vec<_> = granted.difference(&expected).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{}: {name} RBAC differs from src/operator/rbac.rs\nmissing: {missing:?}\nnot used by the code: {extra:?}",
                install.what
            );
            bound.insert(account);
        }
        assert_eq!(
            bound.len(),
            2,
            "{}: the components share one ServiceAccount",
            install.what
        );
        // Any other cluster-wide role is for people (aggregated into admin/edit/view),
        // bound to no zeroscale identity, and only about Functions.
        let component_roles: BTreeSet<&str> = rbac
            .cluster_bindings
            .iter()
            .map(|b| b.role_ref.name.as_str())
            .collect();
        for (name, role) in &rbac.cluster_roles {
            if component_roles.contains(name.as_str()) {
                continue;
            }
            let labels = role.metadata.labels.clone().unwrap_or_default();
            assert!(
                labels
                    .keys()
                    .any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to-")),
                "{}: ClusterRole {name} is neither bound to a component nor aggregated",
                install.what
            );
            for (_, group, resource, _) in
                grants_of(role.rules.as_deref().unwrap_or_default(), &None, name)
            {
                assert_eq!(group, "zeroscale.dev", "{}: {name}", install.what);
                assert!(
                    resource.starts_with("functions"),
                    "{}: {name}",
                    install.what
                );
            }
        }
        if !install.watch_namespaces.is_empty() {
            assert!(
                rbac.cluster_bindings.is_empty(),
                "{}: a namespace-scoped install binds nothing cluster-wide",
                install.what
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Pods: the restricted Pod Security Standard, and the wiring between the components.

#[test]
fn every_pod_runs_restricted() {
    for install in installs() {
        for deployment in typed::<Deployment>(&install.docs, "Deployment") {
            let what = format!(
                "{}: {}",
                install.what,
                deployment.metadata.name.as_deref().unwrap_or("?")
            );
            let pod = pod_spec(&deployment);
            let pod_sc = pod.security_context.clone().unwrap_or_default();
            assert_eq!(
                pod_sc.run_as_non_root,
                Some(true),
                "{what}: pod runAsNonRoot"
            );
            assert_eq!(
                pod_sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
                Some("RuntimeDefault"),
                "{what}: pod seccomp"
            );
            assert!(
                pod.host_network != Some(true)
                    && pod.host_pid != Some(true)
                    && pod.host_ipc != Some(true),
                "{what}: host namespaces"
            );
            let containers = pod
                .containers
                .iter()
                .chain(pod.init_containers.iter().flatten());
            for container in containers {
                let sc = container.security_context.clone().unwrap_or_default();
                let what = format!("{what}/{}", container.name);
                assert_eq!(sc.run_as_non_root, Some(true), "{what}: runAsNonRoot");
                assert_eq!(
                    sc.run_as_user.or(pod_sc.run_as_user),
                    Some(65532),
                    "{what}: runAsUser"
                );
                assert_eq!(
                    sc.read_only_root_filesystem,
                    Some(true),
                    "{what}: readOnlyRootFilesystem"
                );
                assert_eq!(
                    sc.allow_privilege_escalation,
                    Some(false),
                    "{what}: allowPrivilegeEscalation"
                );
                assert_ne!(sc.privileged, Some(true), "{what}: privileged");
                let caps = sc.capabilities.clone().unwrap_or_default();
                assert_eq!(
                    caps.drop,
                    Some(vec!["ALL".to_owned()]),
                    "{what}: drop ALL capabilities"
                );
                assert!(
                    caps.add.unwrap_or_default().is_empty(),
                    "{what}: adds capabilities"
                );
                let seccomp = sc.seccomp_profile.or(pod_sc.seccomp_profile.clone());
                assert_eq!(
                    seccomp.map(|s| s.type_),
                    Some("RuntimeDefault".to_owned()),
                    "{what}: seccomp"
                );
                let resources = container.resources.clone().unwrap_or_default();
                assert!(
                    resources.requests.is_some_and(|r| r.contains_key("memory")),
                    "{what}: memory request"
                );
                assert!(
                    resources.limits.is_some_and(|l| l.contains_key("memory")),
                    "{what}: memory limit"
                );
            }
        }
    }
}

fn container_port(container: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

#[test]
fn components_are_wired_to_each_other() {
    for install in installs() {
        let what = &install.what;
        let deployments: Vec<Deployment> = typed(&install.docs, "Deployment");
        let services: Vec<Service> = typed(&install.docs, "Service");
        let (activator, activator_container) = component(&deployments, "activator");
        let (operator, operator_container) = component(&deployments, "operator");

        // The activator Service: http 80 -> the traffic port 8080, admin 9090.
        let activator_services: Vec<&Service> =
            services.iter().filter(|s| selects(s, activator)).collect();
        let [service] = activator_services[..] else {
            panic!(
                "{what}: expected one Service for the activator, found {}",
                activator_services.len()
            );
        };
        let ports: BTreeMap<String, (i32, Option<i32>)> = service
            .spec
            .iter()
            .flat_map(|s| &s.ports)
            .flatten()
            .map(|p| {
                let target = p
                    .target_port
                    .as_ref()
                    .and_then(|t| container_port(activator_container, t));
                (p.name.clone().unwrap_or_default(), (p.port, target))
            })
            .collect();
        assert_eq!(
            ports.get("http"),
            Some(&(80, Some(8080))),
            "{what}: activator http port"
        );
        assert_eq!(
            ports.get("admin"),
            Some(&(9090, Some(9090))),
            "{what}: activator admin port"
        );
        assert_eq!(
            arg(activator_container, "--listen"),
            Some("0.0.0.0:8080"),
            "{what}"
        );

        // --activator-service names that Service, once the kubelet expanded it.
        let flag = arg(operator_container, "--activator-service")
            .unwrap_or_else(|| panic!("{what}: the operator has no --activator-service"));
        let flag = expand(
            flag,
            operator_container,
            namespace_of(operator),
            "operator-0",
        );
        let expected = format!(
            "{}/{}",
            service.metadata.namespace.as_deref().unwrap_or_default(),
            service.metadata.name.as_deref().unwrap_or_default()
        );
        assert_eq!(flag, expected, "{what}: --activator-service");

        // Both probe the admin port, and have their identity from the downward API.
        for (deployment, container) in [
            (operator, operator_container),
            (activator, activator_container),
        ] {
            for (probe, path) in [
                (&container.liveness_probe, "/healthz"),
                (&container.readiness_probe, "/readyz"),
            ] {
                let get = probe
                    .as_ref()
                    .and_then(|p| p.http_get.as_ref())
                    .expect("an HTTP probe");
                assert_eq!(
                    get.path.as_deref(),
                    Some(path),
                    "{what}: {}",
                    container.name
                );
                assert_eq!(
                    container_port(container, &get.port),
                    Some(9090),
                    "{what}: {}",
                    container.name
                );
            }
            for var in ["POD_NAME", "POD_NAMESPACE"] {
                assert!(
                    container
                        .env
                        .iter()
                        .flatten()
                        .any(|e| e.name == var && e.value_from.is_some()),
                    "{what}: {} lacks {var}",
                    container.name
                );
            }
            check_defaults_mount(&install.docs, deployment, container, what);
        }

        // Leader election keeps two operators from both acting.
        let replicas = operator.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        assert!(replicas >= 2, "{what}: the operator runs a standby");
        assert!(
            arg(operator_container, "--lease-name").is_some(),
            "{what}: the lease is named per release"
        );

        // The drain fits in the grace period.
        let drain = arg(activator_container, "--drain-timeout").expect("--drain-timeout");
        let drain: i64 = drain.trim_end_matches('s').parse().expect("seconds");
        let grace = pod_spec(activator)
            .termination_grace_period_seconds
            .unwrap_or(30);
        assert!(grace > drain, "{what}: grace {grace}s <= drain {drain}s");

        // An HPA, when there is one, owns the activator's replicas.
        let hpas: Vec<HorizontalPodAutoscaler> = typed(&install.docs, "HorizontalPodAutoscaler");
        for hpa in &hpas {
            let target = &hpa.spec.as_ref().expect("spec").scale_target_ref;
            assert_eq!(
                (target.kind.as_str(), Some(target.name.as_str())),
                ("Deployment", activator.metadata.name.as_deref())
            );
            assert!(
                activator.spec.as_ref().and_then(|s| s.replicas).is_none(),
                "{what}: replicas left to the HPA"
            );
        }
        if hpas.is_empty() {
            let replicas = activator
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1);
            assert!(replicas >= 2, "{what}: at least two activators");
        }

        // Every PodDisruptionBudget covers a component and never blocks a drain.
        let pdbs: Vec<PodDisruptionBudget> = typed(&install.docs, "PodDisruptionBudget");
        assert!(!pdbs.is_empty(), "{what}: no PodDisruptionBudget");
        for pdb in pdbs {
            let spec = pdb.spec.expect("spec");
            assert!(
                spec.min_available.is_none(),
                "{what}: minAvailable can block node drains"
            );
            let selector = spec
                .selector
                .and_then(|s| s.match_labels)
                .expect("matchLabels");
            assert!(
                deployments.iter().any(|d| {
                    let labels = d
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.metadata.as_ref())
                        .and_then(|m| m.labels.clone())
                        .unwrap_or_default();
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                }),
                "{what}: a PodDisruptionBudget selects no component"
            );
        }
    }
}

/// `--defaults` is a file of a read-only ConfigMap volume whose content parses as the
/// code parses it (unknown knobs refused, bounds checked).
fn check_defaults_mount(
    docs: &[Value],
    deployment: &Deployment,
    container: &Container,
    what: &str,
) {
    let path = arg(container, "--defaults").unwrap_or_else(|| panic!("{what}: no --defaults"));
    let path = Path::new(path);
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {}", path.display()));
    assert_eq!(
        mount.read_only,
        Some(true),
        "{what}: defaults mounted read-only"
    );
    let volume = pod_spec(deployment)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.config_map.as_ref())
        .unwrap_or_else(|| panic!("{what}: the defaults volume is not a ConfigMap"));
    let config_maps: Vec<ConfigMap> = typed(docs, "ConfigMap");
    let config_map = config_maps
        .iter()
        .find(|c| {
            c.metadata.name == Some(volume.name.clone())
                && c.metadata.namespace == deployment.metadata.namespace
        })
        .unwrap_or_else(|| panic!("{what}: ConfigMap {} is not installed", volume.name));
    let key = path
        .strip_prefix(&mount.mount_path)
        .expect("under the mount");
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(key.to_str().expect("UTF-8")))
        .unwrap_or_else(|| panic!("{what}: ConfigMap {} has no {}", volume.name, key.display()));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("defaults.yaml");
    std::fs::write(&file, text).expect("write defaults");
    Defaults::load(Some(&file)).unwrap_or_else(|e| panic!("{what}: the defaults do not load: {e}"));
}

/// The chart and kustomize ship copies of the generated CRD (Helm and kustomize cannot
/// reach outside their directories); they must be byte-for-byte current.
#[test]
fn crd_copies_are_current() {
    let read = |p: &str| {
        std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("reading {p}: {e}"))
    };
    let generated = read("crds/function.yaml");
    for copy in [
        "charts/zeroscale/crds/function.yaml",
        "config/crd/function.yaml",
    ] {
        assert!(
            read(copy) == generated,
            "{copy} is stale: cp crds/function.yaml {copy}"
        );
    }
}
