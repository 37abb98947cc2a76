//! The `Function` custom resource (`zeroscale.dev/v1alpha1`): the user's contract.
//!
//! The spec is what a user writes: what runs (its own pod `template`, or the
//! `scaleTargetRef` of an existing Deployment or StatefulSet) is required, every other
//! field is optional and its default lives in memory ([`config::Defaults`], overridable cluster-wide), never written back
//! into the object, so GitOps tools see no drift. [`config::FunctionConfig::resolve`]
//! turns a spec into typed, validated settings once; everything downstream reads those.

pub mod config;
pub mod crd;
pub mod duration;
pub mod hosts;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use config::{Defaults, FunctionConfig, Metric};

/// The API group of every zeroscale resource.
pub const GROUP: &str = "zeroscale.dev";
/// The label that marks a Function's pods and owned objects: `zeroscale.dev/function: <name>`.
pub const FUNCTION_LABEL: &str = "zeroscale.dev/function";
/// Condition: everything reconciled and routable (true at zero replicas too).
pub const CONDITION_READY: &str = "Ready";
/// Condition: the Function has ready replicas.
pub const CONDITION_ACTIVE: &str = "Active";
/// Response header set on responses that waited for a wake from zero.
pub const COLD_START_HEADER: &str = "x-zeroscale-cold-start";
/// The path prefix of a replica's drain request to the activators:
/// `/.zeroscale/drain/<namespace>/<name>`, sent by the kubelet as the replica's `preStop`
/// hook (see `activator::drain`). It is only answered for a Host that no Function can
/// have (an IP address, as the kubelet sends), so it never shadows a Function's path.
pub const DRAIN_PATH_PREFIX: &str = "/.zeroscale/drain/";

/// `Active` reason: the `scaleTargetRef` names no existing workload.
pub const REASON_TARGET_NOT_FOUND: &str = "TargetNotFound";
/// `Active` reason: the target selects its pods with more than `matchLabels`, which a
/// Service selector cannot express.
pub const REASON_TARGET_SELECTOR_UNSUPPORTED: &str = "TargetSelectorUnsupported";
/// `Active` reason: an older Function scales the same target.
pub const REASON_TARGET_CONFLICT: &str = "TargetConflict";

/// Reasons on the `Active` condition that mean the Function's replicas cannot start.
/// The activator fails requests fast (503 with the message) while one of them is current.
pub const STARTUP_FAILURE_REASONS: &[&str] = &[
    "ImagePullFailure",
    "CrashLoop",
    "ProgressDeadlineExceeded",
    "Unschedulable",
    "CreateContainerError",
    "InvalidTemplate",
    REASON_TARGET_NOT_FOUND,
    REASON_TARGET_SELECTOR_UNSUPPORTED,
    REASON_TARGET_CONFLICT,
];

// The spec decodes leniently (see `FunctionSpec::undecodable`): a watch lists every
// Function in one response, and one object that the typed decoder refuses (written under
// another version of the CRD, say) must not stop the operator or the activator from
// seeing all the others.
/// A Function: an HTTP workload that zeroscale runs, routes to and scales (to zero).
#[derive(CustomResource, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "zeroscale.dev",
    version = "v1alpha1",
    kind = "Function",
    plural = "functions",
    shortname = "fn",
    category = "zeroscale",
    namespaced,
    status = "FunctionStatus",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.template) || has(self.scaleTargetRef)", "message": "spec.template is required unless spec.scaleTargetRef is set (a Function has exactly one of the two)"},
    {"rule": "!has(self.template) || !has(self.scaleTargetRef)", "message": "spec.scaleTargetRef must not be set together with spec.template (a Function has exactly one of the two)"},
    {"rule": "!has(self.scaleTargetRef) || has(self.port)", "message": "spec.port is required with spec.scaleTargetRef: the container port of the target's pods that serves HTTP"}
]))]
pub struct FunctionSpec {
    /// The pod template each replica runs (a core/v1 PodTemplateSpec): zeroscale creates
    /// and owns a Deployment of it. Its first container serves HTTP on `port`. Only the
    /// shape the activator and the local `dev` mode rely on is checked here; the rest is
    /// checked by the API server when the operator creates the Deployment, and reported
    /// on this Function's status. Exactly one of `template` and `scaleTargetRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crd::pod_template_schema")]
    pub template: Option<PodTemplate>,

    /// An existing Deployment or StatefulSet in the Function's namespace to scale
    /// instead of running a `template`. zeroscale never creates, edits or deletes it: it
    /// routes to its pods (by the target's own `matchLabels` selector) and sets its
    /// replica count through the scale subresource; deleting the Function scales it back
    /// to the replicas it had before. `port` is required with it. Exactly one of
    /// `template` and `scaleTargetRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_target_ref: Option<ScaleTargetRef>,

    /// The container port that serves HTTP. Default: the first `containerPort` of the
    /// first container of `template`, else 8080. Required with `scaleTargetRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// Extra Host names routed to this Function, for an Ingress or Gateway in front of
    /// the activator. Names of the form `<name>.<namespace>[.svc[.<cluster domain>]]` are
    /// reserved for the Function they name and may not be listed here. When two
    /// Functions list the same host, the older one keeps it and the other reports the
    /// conflict on its status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(h, !h.matches('^[^.]+[.][^.]+[.]svc([.].*)?$'))", "message": "hosts may not list cluster service names (<name>.<namespace>.svc...); those route to the Function they name"}
    ]))]
    #[schemars(
        length(max = 16),
        inner(
            length(min = 1, max = 253),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$")
        )
    )]
    pub hosts: Vec<String>,

    /// How the Function scales with its request load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleSpec>,

    /// Time limits for requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,

    /// The queue of requests held while no replica has capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSpec>,

    /// Why the stored spec could not be decoded, with the field path; `None` for every
    /// spec that decodes. Never written: set only by the lenient decoder, and reported
    /// as an invalid spec (status, Event, 503) instead of failing a whole watch.
    #[serde(skip)]
    #[schemars(skip)]
    pub undecodable: Option<String>,
}

/// The typed decoder of a spec, the fields of [`FunctionSpec`] as they are stored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredSpec {
    #[serde(default)]
    template: Option<PodTemplate>,
    #[serde(default)]
    scale_target_ref: Option<ScaleTargetRef>,
    #[serde(default)]
    port: Option<i32>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    scale: Option<ScaleSpec>,
    #[serde(default)]
    timeouts: Option<TimeoutsSpec>,
    #[serde(default)]
    queue: Option<QueueSpec>,
}

impl<'de> Deserialize<'de> for FunctionSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        match serde_path_to_error::deserialize::<_, StoredSpec>(&value) {
            Ok(s) => Ok(FunctionSpec {
                template: s.template,
                scale_target_ref: s.scale_target_ref,
                port: s.port,
                hosts: s.hosts,
                scale: s.scale,
                timeouts: s.timeouts,
                queue: s.queue,
                undecodable: None,
            }),
            Err(e) => {
                let mut path = e.path().to_string();
                // serde names a missing field in its message, at the parent's path.
                let message = e.inner().to_string();
                if let Some(missing) = message
                    .strip_prefix("missing field `")
                    .and_then(|m| m.split('`').next())
                {
                    path = if path == "." || path.is_empty() {
                        missing.to_string()
                    } else {
                        format!("{path}.{missing}")
                    };
                }
                let field = if path == "." || path.is_empty() {
                    "spec".to_string()
                } else {
                    format!("spec.{path}")
                };
                Ok(FunctionSpec {
                    template: value.get("template").cloned().map(PodTemplate::from_value),
                    undecodable: Some(format!("{field}: {}", e.into_inner())),
                    ..FunctionSpec::default()
                })
            }
        }
    }
}

/// The workload a Function scales instead of running its own template.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    /// `apps/v1`, the only API group and version served (optional; accepted so that an
    /// HPA's or KEDA's `scaleTargetRef` can be copied as it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["apps/v1"]))]
    pub api_version: Option<String>,
    /// `Deployment` or `StatefulSet`: both have the scale subresource zeroscale sets
    /// replicas through.
    #[schemars(extend("enum" = ["Deployment", "StatefulSet"]))]
    pub kind: String,
    /// The workload's name, in the Function's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// The kinds of workload a `scaleTargetRef` may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    Deployment,
    StatefulSet,
}

impl TargetKind {
    /// Every kind, in the order the CRD lists them.
    pub const ALL: [TargetKind; 2] = [TargetKind::Deployment, TargetKind::StatefulSet];

    /// The kind named `kind` (exactly as the API spells it).
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "Deployment" => Some(TargetKind::Deployment),
            "StatefulSet" => Some(TargetKind::StatefulSet),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Deployment => "Deployment",
            TargetKind::StatefulSet => "StatefulSet",
        }
    }

    /// The resource's plural (`deployments`), as RBAC and URLs name it.
    pub fn plural(self) -> &'static str {
        match self {
            TargetKind::Deployment => "deployments",
            TargetKind::StatefulSet => "statefulsets",
        }
    }
}

impl std::fmt::Display for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pod template kept as the JSON the user wrote.
///
/// It is deliberately not decoded into a `PodTemplateSpec` while watching: a template the
/// typed decoder refuses would otherwise break the watch of every Function. It is decoded
/// per Function by [`PodTemplate::parse`] and a failure lands on that Function's status.
///
/// It is held as compact JSON text, not as a `serde_json::Value`: every JSON object of a
/// `Value` is a separate map allocation of about 600 bytes, and the operator, the
/// autoscaler and the activator each hold every Function (issue 16). The text is the
/// canonical serialization (keys sorted), so equal templates compare equal.
#[derive(Clone, Debug, PartialEq)]
pub struct PodTemplate(Box<str>);

impl Default for PodTemplate {
    fn default() -> Self {
        Self::from_value(serde_json::Value::Null)
    }
}

impl PodTemplate {
    /// A template from its JSON.
    pub fn from_value(value: serde_json::Value) -> Self {
        Self(value.to_string().into_boxed_str())
    }

    /// The template's JSON.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or_default()
    }

    /// Decodes the template into the typed core/v1 form.
    pub fn parse(&self) -> Result<PodTemplateSpec, serde_json::Error> {
        serde_json::from_value(self.value())
    }

    /// Builds one from a typed template (tests and fixtures).
    pub fn from_spec(spec: &PodTemplateSpec) -> Self {
        Self::from_value(serde_json::to_value(spec).unwrap_or_default())
    }
}

impl Serialize for PodTemplate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for PodTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(deserializer).map(Self::from_value)
    }
}

impl JsonSchema for PodTemplate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PodTemplate".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        crd::pod_template_schema(generator)
    }
}

/// Which per-replica load the autoscaler follows.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum MetricKind {
    /// Requests in flight at once.
    #[default]
    Concurrency,
    /// Requests per second.
    Rps,
}

/// How a Function scales. Every field is optional; the defaults are the cluster's.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.min) || !has(self.max) || self.min <= self.max", "message": "scale.min must not exceed scale.max"},
    {"rule": "!has(self.initial) || !has(self.max) || self.initial <= self.max", "message": "scale.initial must not exceed scale.max"},
    {"rule": "!has(self.initial) || !has(self.min) || self.initial >= self.min", "message": "scale.initial must be at least scale.min"}
]))]
pub struct ScaleSpec {
    /// Fewest replicas. 0 lets the Function scale to zero when idle. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: Option<i32>,
    /// Most replicas. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: Option<i32>,
    /// Replicas started when a request wakes the Function from zero; within
    /// [max(min, 1), max]. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub initial: Option<i32>,
    /// The load the autoscaler follows: `concurrency` (requests in flight) or `rps`
    /// (requests per second). Default concurrency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<MetricKind>,
    /// Soft target of the metric per replica. Default 10 (concurrency) or 100 (rps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub target: Option<i32>,
    /// Percent of `target` the autoscaler aims at, leaving headroom for bursts. Default 70.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub utilization: Option<i32>,
    /// Hard cap of requests in flight per replica; excess waits in the queue. 0 means no
    /// cap. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub container_concurrency: Option<i32>,
    /// The stable window the load is averaged over (6s to 1h); a replica count, once
    /// raised, holds at least this long before a scale-down (idle to zero excepted).
    /// Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub window: Option<String>,
    /// The panic window, as a percent of `window` (1 to 100). Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub panic_window_percent: Option<i32>,
    /// Panic mode starts when the panic-window load reaches this percent of the current
    /// capacity (110 to 1000). Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 110, max = 1000))]
    pub panic_threshold_percent: Option<i32>,
    /// With no request for this long (and none in flight or queued) the Function goes to
    /// `min` (zero when min is 0). At least 1s. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub idle_timeout: Option<String>,
    /// A scale-down waits until the lower count has held this long (0s to 1h). Default 0s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub scale_down_delay: Option<String>,
    /// Largest factor replicas may grow by in one decision (>= 1.1). Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.1, max = 10000.0))]
    pub max_scale_up_rate: Option<f64>,
    /// Largest factor replicas may shrink by in one decision (>= 1.1). Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.1, max = 10000.0))]
    pub max_scale_down_rate: Option<f64>,
}

/// Time limits for requests.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// Longest a request waits for a ready replica before it gets 504 (1s to 1h).
    /// Default 120s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub activation: Option<String>,
    /// Longest a request may take once forwarded, until its response has begun (1s to
    /// 24h). Default 300s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub request: Option<String>,
}

/// The queue of requests held while no replica has capacity.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Requests held per activator while waiting for capacity; beyond it a request gets
    /// 503 with Retry-After (1 to 100000). Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub capacity: Option<i32>,
}

/// What zeroscale observed of a Function. Written by the operator (reconcile state) and
/// the autoscaler (`desiredReplicas`, `lastRequestTime`) with separate field managers.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The in-cluster URL the Function answers at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Replicas that exist (ready or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Replicas ready to serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The label selector of the pods that serve this Function (`key=value,...`, as
    /// `kubectl get pods -l` takes it). With a `scaleTargetRef` it is set only while the
    /// Function holds its target, which is when the autoscaler and the activators scale
    /// it; an activator's drain of a stopping replica finds the Function's pods with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Replicas the autoscaler last asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the activators last saw a request for this Function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request_time: Option<Time>,
    /// `Ready` (reconciled and routable, true at zero too) and `Active` (has ready
    /// replicas), each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Names a Function: its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FunctionKey {
    pub namespace: String,
    pub name: String,
}

impl FunctionKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Function {
    /// The Function's namespace/name (namespace `default` when unset, as kubectl does).
    pub fn key(&self) -> FunctionKey {
        FunctionKey::new(
            self.namespace().unwrap_or_else(|| "default".into()),
            self.name_any(),
        )
    }

    /// The in-cluster URL of this Function.
    pub fn url(&self, cluster_domain: &str) -> String {
        let key = self.key();
        format!(
            "http://{}.{}.svc.{}",
            key.name, key.namespace, cluster_domain
        )
    }

    /// A condition of the status by type.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }

    /// The workload named by `spec.scaleTargetRef`, when it names a kind zeroscale can
    /// scale (`None` for a template Function, or an unknown kind).
    pub fn scale_target(&self) -> Option<(TargetKind, &str)> {
        let target = self.spec.scale_target_ref.as_ref()?;
        Some((TargetKind::parse(&target.kind)?, target.name.as_str()))
    }

    /// The reason this Function's replicas cannot start, if its status says so for the
    /// current generation of its spec. A newer spec gets a fresh chance.
    pub fn startup_failure(&self) -> Option<String> {
        let active = self.condition(CONDITION_ACTIVE)?;
        if active.status != "False" || !STARTUP_FAILURE_REASONS.contains(&active.reason.as_str()) {
            return None;
        }
        if let (Some(seen), Some(current)) = (active.observed_generation, self.metadata.generation)
            && seen < current
        {
            return None;
        }
        Some(format!("{}: {}", active.reason, active.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn with_active(reason: &str, status: &str, seen: Option<i64>, generation: i64) -> Function {
        let mut f = Function::new(
            "hello",
            FunctionSpec {
                template: Some(PodTemplate::default()),
                ..FunctionSpec::default()
            },
        );
        f.metadata.namespace = Some("default".into());
        f.metadata.generation = Some(generation);
        f.status = Some(FunctionStatus {
            conditions: vec![Condition {
                type_: CONDITION_ACTIVE.into(),
                status: status.into(),
                reason: reason.into(),
                message: "back-off pulling image \"nope\"".into(),
                observed_generation: seen,
                last_transition_time: Time(jiff::Timestamp::now()),
            }],
            ..Default::default()
        });
        f
    }

    #[test]
    fn startup_failure_is_reported_for_the_current_generation_only() {
        let failing = with_active("ImagePullFailure", "False", Some(3), 3);
        assert_eq!(
            failing.startup_failure().as_deref(),
            Some("ImagePullFailure: back-off pulling image \"nope\"")
        );
        // The user fixed the spec: the old failure must not block the new generation.
        assert_eq!(
            with_active("ImagePullFailure", "False", Some(3), 4).startup_failure(),
            None
        );
        // Scaled to zero is not a failure.
        assert_eq!(
            with_active("ScaledToZero", "False", Some(3), 3).startup_failure(),
            None
        );
        assert_eq!(
            with_active("CrashLoop", "True", Some(3), 3).startup_failure(),
            None
        );
    }

    #[test]
    fn key_and_url() {
        let f = with_active("x", "True", None, 1);
        assert_eq!(f.key(), FunctionKey::new("default", "hello"));
        assert_eq!(
            f.url("cluster.local"),
            "http://hello.default.svc.cluster.local"
        );
    }
}
