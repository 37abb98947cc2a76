//! The pure "build" step: the objects a Function should own, computed from its resolved
//! config and the activator's endpoints, with no API access. Everything a user relies on
//! (names, labels, selectors, ports, owner references, who owns `replicas`) is decided
//! here, so it is tested from fixtures without a cluster.
//!
//! # Draining a replica before it stops
//!
//! A replica can be stopped at any time: a scale-down, a rollout of a new template, the
//! Function's deletion, a node drain. The kubelet then runs the container's `preStop`
//! hook and only afterwards sends SIGTERM, which many apps (python's `http.server`
//! among them) answer by dying with their requests. The activators know which requests
//! are in flight to which replica, so the operator gives the serving container a
//! `preStop` `httpGet` to the activator Service (its ClusterIP, reachable from every
//! node; no binary in the image, no sidecar, and on every Kubernetes version): the
//! activator that receives it answers once no activator has a request in flight to a
//! replica of the Function that has left the ready set (see `activator::drain`). The
//! grace period is the user's (30 s by default) plus `timeouts.request`, so the kubelet
//! never cuts a drain that waits for the longest request. A container with a `preStop`
//! of its own keeps it (and its app drains itself); without a known activator Service
//! address there is no hook and the user's grace period is kept.

//!
//! # No Service links by default
//!
//! Every Function has two Services, so a namespace of N Functions holds 2N of them, and
//! the kubelet gives every container of the namespace about seven environment variables
//! per Service (Docker links' `NAME_SERVICE_HOST`, `NAME_PORT_80_TCP`, ...): at 10,000
//! Functions 140,000 variables, past the kernel's limit on a process's environment, and
//! a container that cannot start (`argument list too long`; at 10,000 Functions on the
//! stand-in node the wake Function's pod never started). So the Deployment's template
//! sets `enableServiceLinks: false`, as Knative does, unless the user's template sets it;
//! DNS names, or the `default/kubernetes` variables the kubelet always sets, remain.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{ObjectReference, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use super::target::{RECORD_ANNOTATION, Record};
use crate::api::{FUNCTION_LABEL, Function, FunctionConfig};

/// The field manager of every object (and status field) the reconciler writes.
pub const FIELD_MANAGER: &str = "zeroscale-operator";
/// Marks owned Services and slices: `private` (selects the pods) or `public` (the
/// selector-less Service clients call, and its EndpointSlice).
pub const SERVICE_LABEL: &str = "zeroscale.dev/service";
/// Annotation holding a hash of what the operator last applied. It lets the reconciler
/// see a field the user *removed* from the spec, which a subset comparison cannot.
pub const HASH_ANNOTATION: &str = "zeroscale.dev/applied-hash";
/// `endpointslice.kubernetes.io/managed-by` of the slices zeroscale writes (never the
/// built-in controller's value, or it would delete them). A label *value*: no `/`, as
/// the built-in `endpointslice-controller.k8s.io`.
pub const SLICE_MANAGER: &str = "operator.zeroscale.dev";
/// The port name shared by the Services and the EndpointSlices (they must match).
pub const PORT_NAME: &str = "http";
/// The port the public Service answers on.
pub const PUBLIC_PORT: i32 = 80;

/// The longest Function name whose objects all have valid names (`<name>-private` and
/// `<name>-activator` must be DNS-1035 labels of at most 63 characters).
pub const MAX_NAME_LEN: usize = 63 - "-activator".len();

/// Why a Function's name cannot name its Services (Function names may be DNS subdomains,
/// with dots or a leading digit; Service names may not).
pub fn check_name(name: &str) -> Option<String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    (!valid).then(|| {
        format!(
            "metadata.name: {name:?} must be a DNS-1035 label (lower-case letters, digits and \
             '-', starting with a letter) of at most {MAX_NAME_LEN} characters, because it \
             names the Function's Services"
        )
    })
}

/// Whether `value` is a valid label value: at most 63 characters of alphanumerics, `-`,
/// `_` and `.`, beginning and ending with an alphanumeric (or empty). The API server
/// refuses an object with any other.
pub fn is_label_value(value: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    value.is_empty()
        || (value.len() <= 63
            && value.starts_with(alnum)
            && value.ends_with(alnum)
            && value
                .chars()
                .all(|c| alnum(c) || matches!(c, '-' | '_' | '.')))
}

/// Whether `key` is a valid label or annotation key: an optional DNS-subdomain prefix
/// (at most 253 characters) and `/`, then a name as [`is_label_value`] but not empty.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// The name of a Function's private Service (selects its pods).
pub fn private_service_name(function: &str) -> String {
    format!("{function}-private")
}

/// The name of the EndpointSlice that points a Function's public Service at the activators.
pub fn activator_slice_name(function: &str) -> String {
    format!("{function}-activator")
}

/// Where a replica's `preStop` asks the activators to drain it: the activator Service's
/// ClusterIP and its `http` port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainHook {
    pub host: String,
    pub port: i32,
}

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// One ready activator pod.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivatorEndpoint {
    /// Pod IP, of the family in `address_type` (never loopback: a cluster refuses that).
    pub ip: String,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// The activator pod, for `kubectl describe` and topology tools.
    pub target_ref: Option<ObjectReference>,
}

/// The ready activator pods and the port their traffic listener is on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActivatorEndpoints {
    pub port: i32,
    /// `IPv4`, or `IPv6` on a single-stack IPv6 cluster (empty means `IPv4`).
    pub address_type: String,
    /// Sorted, deduplicated by IP.
    pub endpoints: Vec<ActivatorEndpoint>,
    /// The activator Service's address for replicas' drain hooks, once it is known.
    pub drain: Option<DrainHook>,
}

/// What the reconciler does with `spec.replicas` of the Deployment.
///
/// Replicas belong to the autoscaler and the activator. The reconciler sets them when it
/// creates the Deployment. Afterwards, while no other manager has touched them, it keeps
/// sending the *live* value (with the read resourceVersion as a precondition), because
/// server-side apply would otherwise reset a field its manager stops sending to the
/// default of 1 and wake an idle Function. Once the scale subresource was written by
/// someone else, it omits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicas {
    /// The Deployment does not exist: create it with this many (`scale.min`).
    Create(i32),
    /// Only the operator owns `spec.replicas`: send the live value unchanged.
    Keep(i32),
    /// Someone else owns `spec.replicas`: leave it out.
    Omit,
}

impl Replicas {
    /// Decides from the live Deployment (`None`: not there yet).
    pub fn decide(existing: Option<&Deployment>, min: u32) -> Self {
        let Some(d) = existing else {
            return Replicas::Create(i32::try_from(min).unwrap_or(0));
        };
        let live = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        if replicas_owned_only_by_us(d) {
            Replicas::Keep(live)
        } else {
            Replicas::Omit
        }
    }

    fn value(self) -> Option<i32> {
        match self {
            Replicas::Create(n) | Replicas::Keep(n) => Some(n),
            Replicas::Omit => None,
        }
    }
}

/// Whether `spec.replicas` is owned by the operator's apply and by no other manager.
fn replicas_owned_only_by_us(d: &Deployment) -> bool {
    let mut ours = false;
    for entry in d.metadata.managed_fields.iter().flatten() {
        let owns = entry
            .fields_v1
            .as_ref()
            .and_then(|f| f.0.get("f:spec"))
            .and_then(|s| s.get("f:replicas"))
            .is_some();
        if !owns {
            continue;
        }
        if entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry.operation.as_deref() == Some("Apply")
        {
            ours = true;
        } else {
            return false;
        }
    }
    ours
}

/// The routing objects of a Function: the same for template and target Functions.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub private_service: Service,
    pub public_service: Service,
    /// `None` while the activator endpoints are not known yet.
    pub activator_slice: Option<EndpointSlice>,
}

/// The objects one Function owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub deployment: Deployment,
    pub private_service: Service,
    pub public_service: Service,
    /// `None` while the activator endpoints are not known yet (never write an empty set
    /// before the first list of the activator's slices).
    pub activator_slice: Option<EndpointSlice>,
}

/// Why the objects could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the Function has no uid or namespace yet (not stored by the API server)")]
    NotStored,
    #[error("{0}")]
    Patch(String),
}

/// Builds every object a Function owns.
pub fn build(
    function: &Function,
    config: &FunctionConfig,
    replicas: Replicas,
    activators: Option<&ActivatorEndpoints>,
) -> Result<Desired, BuildError> {
    let owner = owner_reference(function).ok_or(BuildError::NotStored)?;
    let namespace = function
        .metadata
        .namespace
        .clone()
        .ok_or(BuildError::NotStored)?;
    let name = function
        .metadata
        .name
        .clone()
        .ok_or(BuildError::NotStored)?;
    let selector = BTreeMap::from([(FUNCTION_LABEL.to_string(), name.clone())]);

    // The user's pod template, with the label the selector needs (which wins over theirs).
    let mut template = config.template().cloned().unwrap_or_default();
    let template_meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    template_meta
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(selector.clone());
    // No Service links unless the template asks for them (see the module docs).
    if let Some(spec) = template.spec.as_mut() {
        spec.enable_service_links.get_or_insert(false);
    }
    if let Some(hook) = activators.and_then(|a| a.drain.as_ref()) {
        add_drain_hook(
            &mut template,
            hook,
            &namespace,
            &name,
            config.timeouts.request,
        );
    }
    let deployment = Deployment {
        metadata: object_meta(name.clone(), &namespace, &name, None, &owner),
        spec: Some(DeploymentSpec {
            replicas: replicas.value(),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    };

    let Routing {
        private_service,
        public_service,
        activator_slice,
    } = routing(function, config.port, selector, None, activators)?;

    let mut desired = Desired {
        deployment,
        private_service,
        public_service,
        activator_slice,
    };
    stamp_hash(&mut desired.deployment, true);
    Ok(desired)
}

/// Builds the routing objects of a Function with a `scaleTargetRef`. While it holds its
/// target, `hold` has the target's pod selector and the record to keep on the private
/// Service; otherwise the private Service selects the Function's own label, which no pod
/// has: no replica to route to.
///
/// It always has a selector: a headless Service created without one is defaulted to
/// `ipFamilyPolicy: RequireDualStack`, which a single-stack cluster then refuses as soon
/// as a selector is added (seen on a real API server).
pub fn build_target(
    function: &Function,
    config: &FunctionConfig,
    hold: Option<(&BTreeMap<String, String>, &Record)>,
    activators: Option<&ActivatorEndpoints>,
) -> Result<Routing, BuildError> {
    let own = || {
        BTreeMap::from([(
            FUNCTION_LABEL.to_string(),
            function.metadata.name.clone().unwrap_or_default(),
        )])
    };
    routing(
        function,
        config.port,
        hold.map_or_else(own, |(s, _)| s.clone()),
        hold.map(|(_, r)| r),
        activators,
    )
}

/// The private Service (selecting `selector`, with `record` as an annotation), the
/// public Service and its activator EndpointSlice.
fn routing(
    function: &Function,
    port: u16,
    selector: BTreeMap<String, String>,
    record: Option<&Record>,
    activators: Option<&ActivatorEndpoints>,
) -> Result<Routing, BuildError> {
    let owner = owner_reference(function).ok_or(BuildError::NotStored)?;
    let namespace = function
        .metadata
        .namespace
        .clone()
        .ok_or(BuildError::NotStored)?;
    let name = function
        .metadata
        .name
        .clone()
        .ok_or(BuildError::NotStored)?;
    let meta = |object_name: String, service: &str| {
        object_meta(object_name, &namespace, &name, Some(service), &owner)
    };

    let private_service = Service {
        metadata: meta(private_service_name(&name), "private"),
        spec: Some(ServiceSpec {
            // Headless: the activator connects to pod IPs from the slices; a virtual IP
            // and kube-proxy rules would be unused.
            cluster_ip: Some("None".into()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: i32::from(port),
                target_port: Some(IntOrString::Int(i32::from(port))),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };

    let public_service = Service {
        metadata: meta(name.clone(), "public"),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: PUBLIC_PORT,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };

    let activator_slice = activators.map(|a| {
        let mut metadata = meta(activator_slice_name(&name), "public");
        let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
        labels.insert("kubernetes.io/service-name".into(), name.clone());
        labels.insert(
            "endpointslice.kubernetes.io/managed-by".into(),
            SLICE_MANAGER.into(),
        );
        EndpointSlice {
            metadata,
            address_type: if a.address_type.is_empty() {
                "IPv4".into()
            } else {
                a.address_type.clone()
            },
            endpoints: a
                .endpoints
                .iter()
                .map(|e| SliceEndpoint {
                    addresses: vec![e.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: e.node_name.clone(),
                    zone: e.zone.clone(),
                    target_ref: e.target_ref.clone(),
                    ..SliceEndpoint::default()
                })
                .collect(),
            // Without a ready activator the port is unknown; a slice may not carry 0.
            ports: Some(
                (a.port > 0)
                    .then(|| EndpointPort {
                        name: Some(PORT_NAME.into()),
                        port: Some(a.port),
                        protocol: Some("TCP".into()),
                        app_protocol: None,
                    })
                    .into_iter()
                    .collect(),
            ),
        }
    });

    let mut routing = Routing {
        private_service,
        public_service,
        activator_slice,
    };
    if let Some(r) = record {
        routing
            .private_service
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(RECORD_ANNOTATION.into(), r.to_annotation());
    }
    stamp_hash(&mut routing.private_service, false);
    stamp_hash(&mut routing.public_service, false);
    if let Some(s) = routing.activator_slice.as_mut() {
        stamp_hash(s, false);
    }
    Ok(routing)
}

/// The metadata of an object a Function owns: its labels and the owner reference.
fn object_meta(
    object_name: String,
    namespace: &str,
    function: &str,
    service: Option<&str>,
    owner: &OwnerReference,
) -> ObjectMeta {
    let mut labels = BTreeMap::from([
        (FUNCTION_LABEL.to_string(), function.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "zeroscale".to_string(),
        ),
    ]);
    if let Some(s) = service {
        labels.insert(SERVICE_LABEL.to_string(), s.to_string());
    }
    ObjectMeta {
        name: Some(object_name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Gives the serving container (the first) a `preStop` that waits for the activators to
/// drain the replica, and a grace period long enough for it (see the module docs).
fn add_drain_hook(
    template: &mut k8s_openapi::api::core::v1::PodTemplateSpec,
    hook: &DrainHook,
    namespace: &str,
    name: &str,
    request_timeout: std::time::Duration,
) {
    use k8s_openapi::api::core::v1::{HTTPGetAction, Lifecycle, LifecycleHandler};
    let Some(spec) = template.spec.as_mut() else {
        return;
    };
    let Some(container) = spec.containers.first_mut() else {
        return;
    };
    let lifecycle = container.lifecycle.get_or_insert_with(Lifecycle::default);
    if lifecycle.pre_stop.is_some() {
        return;
    }
    lifecycle.pre_stop = Some(LifecycleHandler {
        http_get: Some(HTTPGetAction {
            host: Some(hook.host.clone()),
            port: IntOrString::Int(hook.port),
            path: Some(format!(
                "{}{namespace}/{name}",
                crate::api::DRAIN_PATH_PREFIX
            )),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        ..LifecycleHandler::default()
    });
    let drain = i64::try_from(request_timeout.as_secs()).unwrap_or(i64::MAX);
    let grace = spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE_SECONDS);
    spec.termination_grace_period_seconds = Some(grace.saturating_add(drain));
}

/// The controller owner reference to a Function (garbage collection follows it).
/// `blockOwnerDeletion` is left unset: setting it needs `update` on `functions/finalizers`
/// where the OwnerReferencesPermissionEnforcement admission plugin runs.
pub fn owner_reference(function: &Function) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Function::api_version(&()).into_owned(),
        kind: Function::kind(&()).into_owned(),
        name: function.metadata.name.clone()?,
        uid: function.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

/// Writes the hash of `object` (replicas excluded for Deployments: they change under
/// the operator's feet by design) into its annotations.
fn stamp_hash<K: serde::Serialize + Resource>(object: &mut K, drop_replicas: bool) {
    let mut value = serde_json::to_value(&*object).unwrap_or_default();
    if drop_replicas && let Some(spec) = value.get_mut("spec").and_then(|s| s.as_object_mut()) {
        spec.remove("replicas");
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hash_json(&value, &mut hasher);
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_ANNOTATION.into(), format!("{:016x}", hasher.finish()));
}

fn hash_json(value: &serde_json::Value, h: &mut impl Hasher) {
    // serde_json maps are ordered (BTreeMap) without `preserve_order`; the text is stable.
    value.to_string().hash(h);
}

/// Whether every field of `desired` has the same value in `live` (extra fields in
/// `live`, such as server defaults, are ignored; lists must have the same length).
pub fn is_subset(desired: &serde_json::Value, live: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => is_subset(dv, lv),
            None => is_empty(dv),
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(dv, lv)| is_subset(dv, lv))
        }
        (Value::Array(d), Value::Null) => d.is_empty(),
        (d, l) => d == l,
    }
}

/// An empty value the API server drops when it stores an object.
fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(m) => m.values().all(is_empty),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Whether `live` already has everything of `desired`: the same applied hash and no
/// drift on any field the operator sets. When true, applying would change nothing.
pub fn up_to_date<K: serde::Serialize + Resource>(desired: &K, live: Option<&K>) -> bool {
    let Some(live) = live else { return false };
    let want = desired
        .meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(HASH_ANNOTATION));
    let have = live
        .meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(HASH_ANNOTATION));
    if want.is_none() || want != have {
        return false;
    }
    match (serde_json::to_value(desired), serde_json::to_value(live)) {
        (Ok(mut d), Ok(l)) => {
            // Status is never applied through the main resource.
            if let Some(o) = d.as_object_mut() {
                o.remove("status");
            }
            is_subset(&d, &l)
        }
        _ => false,
    }
}
