//! Defaults and validation: a Function spec becomes a typed [`FunctionConfig`] here, once.
//!
//! The defaults are in memory (never written into the object) and can be overridden
//! cluster-wide with a YAML file shaped like a Function spec's `scale`, `timeouts` and
//! `queue` (the Helm chart mounts one). [`FunctionConfig::resolve`] applies them and
//! checks everything the CRD schema checks at admission (OpenAPI bounds and CEL rules,
//! which a 1.24 API server without the CEL gate does not enforce) plus what the schema
//! cannot say, and reports every problem with its field path.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
use serde::{Deserialize, Serialize};

use super::duration::{format_duration, parse_duration};
use super::hosts::{is_reserved_host, is_valid_hostname};
use super::{FunctionSpec, MetricKind, QueueSpec, ScaleSpec, TargetKind, TimeoutsSpec};

/// The default port a Function serves on when neither `port` nor a `containerPort` says.
pub const DEFAULT_PORT: u16 = 8080;

/// One problem with a spec, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.scale.min`.
    pub field: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl std::fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

impl ValidationErrors {
    /// Whether some error concerns this field (or one below it).
    pub fn mentions(&self, field: &str) -> bool {
        self.0.iter().any(|e| e.field.starts_with(field))
    }
}

/// Cluster-wide defaults for the optional fields of a Function spec, in the spec's own
/// shape. Anything left out falls back to the built-in value documented on the field.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Defaults {
    #[serde(default)]
    pub scale: ScaleSpec,
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    #[serde(default)]
    pub queue: QueueSpec,
}

impl Defaults {
    /// Parses defaults, refusing unknown fields (a typo must not silently do nothing).
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let input: serde_json::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let input = if input.is_null() {
            serde_json::json!({})
        } else {
            input
        };
        let defaults: Defaults =
            serde_json::from_value(input.clone()).map_err(|e| e.to_string())?;
        let back = serde_json::to_value(&defaults).map_err(|e| e.to_string())?;
        let mut unknown = Vec::new();
        unknown_fields(&input, &back, "", &mut unknown);
        if !unknown.is_empty() {
            return Err(format!("unknown field(s): {}", unknown.join(", ")));
        }
        Ok(defaults)
    }

    /// Reads defaults from a YAML file; the built-in values apply when `path` is `None`.
    /// The file is checked like a spec, so a bad default fails at start-up, not later.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, crate::Error> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| crate::Error::Io {
            context: format!("reading defaults file {}", path.display()),
            source,
        })?;
        let defaults = Self::from_yaml(&text)
            .map_err(|e| crate::Error::Config(format!("defaults file {}: {e}", path.display())))?;
        // Resolve a minimal spec against the defaults to check them.
        let probe = FunctionSpec {
            template: Some(super::PodTemplate::from_value(
                serde_json::json!({"spec": {"containers": [{"name": "probe"}]}}),
            )),
            ..FunctionSpec::default()
        };
        FunctionConfig::resolve(&probe, &defaults)
            .map_err(|e| crate::Error::Config(format!("defaults file {}: {e}", path.display())))?;
        Ok(defaults)
    }
}

fn unknown_fields(
    input: &serde_json::Value,
    known: &serde_json::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    if let (Some(i), Some(k)) = (input.as_object(), known.as_object()) {
        for (key, value) in i {
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match k.get(key) {
                Some(kv) => unknown_fields(value, kv, &here, out),
                None => out.push(here),
            }
        }
    }
}

/// The metric the autoscaler follows, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Concurrency,
    Rps,
}

/// Resolved scaling settings (see [`ScaleSpec`] for the meaning of each).
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    pub min: u32,
    pub max: u32,
    pub initial: u32,
    pub metric: Metric,
    /// Per-replica soft target of the metric.
    pub target: f64,
    /// Fraction (0, 1] of `target` aimed at.
    pub utilization: f64,
    /// Hard cap of in-flight requests per replica; `None` when unlimited.
    pub container_concurrency: Option<u32>,
    pub window: Duration,
    pub panic_window: Duration,
    /// Panic threshold as a fraction (2.0 = 200%).
    pub panic_threshold: f64,
    pub idle_timeout: Duration,
    pub scale_down_delay: Duration,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
}

/// Resolved time limits.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeoutsConfig {
    pub activation: Duration,
    pub request: Duration,
}

/// The existing workload a Function scales (`spec.scaleTargetRef`), resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScaleTarget {
    pub kind: TargetKind,
    pub name: String,
}

impl std::fmt::Display for ScaleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// What a Function runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Its own pods from `spec.template` (decoded): zeroscale owns their Deployment.
    Template(Box<PodTemplateSpec>),
    /// Someone else's Deployment or StatefulSet, only scaled.
    Target(ScaleTarget),
}

/// A Function spec with defaults applied and every value checked.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionConfig {
    /// What runs: the decoded pod template, or the target.
    pub workload: Workload,
    /// The container port that serves HTTP.
    pub port: u16,
    /// Extra hosts from `spec.hosts`, lower-cased.
    pub hosts: Vec<String>,
    pub scale: ScaleConfig,
    pub timeouts: TimeoutsConfig,
    /// Requests held per activator while waiting for capacity.
    pub queue_capacity: usize,
}

impl FunctionConfig {
    /// The pod template, for a template Function.
    pub fn template(&self) -> Option<&PodTemplateSpec> {
        match &self.workload {
            Workload::Template(t) => Some(t),
            Workload::Target(_) => None,
        }
    }

    /// The workload scaled, for a Function with a `scaleTargetRef`.
    pub fn target(&self) -> Option<&ScaleTarget> {
        match &self.workload {
            Workload::Target(t) => Some(t),
            Workload::Template(_) => None,
        }
    }

    /// Applies `defaults` to `spec` and validates the result; returns every problem found.
    pub fn resolve(spec: &FunctionSpec, defaults: &Defaults) -> Result<Self, ValidationErrors> {
        if let Some(problem) = &spec.undecodable {
            let (field, message) = problem
                .split_once(": ")
                .unwrap_or(("spec", problem.as_str()));
            return Err(ValidationErrors(vec![FieldError {
                field: field.to_string(),
                message: format!("cannot be decoded: {message}"),
            }]));
        }
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                field: field.to_string(),
                message,
            })
        };

        // --- what runs: exactly one of template and scaleTargetRef (the CRD's CEL rules
        // say the same, with the same field first in each message)
        match (&spec.template, &spec.scale_target_ref) {
            (Some(_), Some(_)) => err(
                "spec.scaleTargetRef",
                "must not be set together with spec.template (a Function has exactly one of the two)".into(),
            ),
            (None, None) => err(
                "spec.template",
                "is required unless spec.scaleTargetRef is set (a Function has exactly one of the two)".into(),
            ),
            _ => {}
        }

        // --- template
        let template = match spec.template.as_ref().map(super::PodTemplate::parse) {
            None => PodTemplateSpec::default(),
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                err("spec.template", format!("is not a valid pod template: {e}"));
                PodTemplateSpec::default()
            }
        };
        let containers: &[Container] = template
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        if spec.template.is_some() && containers.is_empty() {
            err(
                "spec.template.spec.containers",
                "must list at least one container".into(),
            );
        }
        for (i, c) in containers.iter().enumerate() {
            if c.name.is_empty() {
                err(
                    &format!("spec.template.spec.containers[{i}].name"),
                    "is required".into(),
                );
            }
        }

        // --- scaleTargetRef
        let scale_target = spec.scale_target_ref.as_ref().and_then(|r| {
            if let Some(v) = r.api_version.as_deref().filter(|v| *v != "apps/v1") {
                err(
                    "spec.scaleTargetRef.apiVersion",
                    format!("must be apps/v1, got {v:?}"),
                );
            }
            let kind = TargetKind::parse(&r.kind);
            if kind.is_none() {
                err(
                    "spec.scaleTargetRef.kind",
                    format!("must be Deployment or StatefulSet, got {:?}", r.kind),
                );
            }
            if !is_object_name(&r.name) {
                err(
                    "spec.scaleTargetRef.name",
                    format!(
                        "{:?} is not an object name (lower-case letters, digits, '-' and '.', at most 253 characters)",
                        r.name
                    ),
                );
            }
            if spec.port.is_none() {
                err(
                    "spec.port",
                    "is required with spec.scaleTargetRef: the container port of the target's pods that serves HTTP".into(),
                );
            }
            Some(ScaleTarget {
                kind: kind?,
                name: r.name.clone(),
            })
        });

        // --- port
        let first_container_port = containers
            .first()
            .and_then(|c| c.ports.as_ref())
            .and_then(|p| p.first())
            .map(|p| p.container_port);
        let port = match spec.port.or(first_container_port) {
            None => DEFAULT_PORT,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => {
                let field = if spec.port.is_some() {
                    "spec.port"
                } else {
                    "spec.template.spec.containers[0].ports[0].containerPort"
                };
                err(field, format!("must be between 1 and 65535, got {p}"));
                DEFAULT_PORT
            }
        };

        // --- hosts
        let mut hosts = Vec::new();
        if spec.hosts.len() > 16 {
            err(
                "spec.hosts",
                format!("may list at most 16 hosts, got {}", spec.hosts.len()),
            );
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            let host = h.trim_end_matches('.').to_ascii_lowercase();
            let field = format!("spec.hosts[{i}]");
            if !is_valid_hostname(&host) || !host.contains('.') {
                err(
                    &field,
                    format!("{h:?} is not a DNS name with at least two labels"),
                );
            } else if is_reserved_host(&host) {
                err(
                    &field,
                    format!(
                        "{h:?} is a cluster service name (<name>.<namespace>.svc...); those are routed to the Function they name"
                    ),
                );
            } else if hosts.contains(&host) {
                err(&field, format!("{h:?} is listed twice"));
            } else {
                hosts.push(host);
            }
        }

        // --- scale
        let s = spec.scale.clone().unwrap_or_default();
        let d = &defaults.scale;
        let int = |v: Option<i32>, dv: Option<i32>, builtin: i32| v.or(dv).unwrap_or(builtin);
        let min = int(s.min, d.min, 0);
        let max = int(s.max, d.max, 10);
        let initial = int(s.initial, d.initial, 1.max(min));
        let metric = match s.metric.or(d.metric).unwrap_or_default() {
            MetricKind::Concurrency => Metric::Concurrency,
            MetricKind::Rps => Metric::Rps,
        };
        let default_target = match metric {
            Metric::Concurrency => 10,
            Metric::Rps => 100,
        };
        let target = int(s.target, d.target, default_target);
        let utilization = int(s.utilization, d.utilization, 70);
        let cc = int(s.container_concurrency, d.container_concurrency, 0);
        let panic_window_percent = int(s.panic_window_percent, d.panic_window_percent, 10);
        let panic_threshold_percent =
            int(s.panic_threshold_percent, d.panic_threshold_percent, 200);

        let mut range = |field: &str, v: i32, lo: i32, hi: i32| {
            if v < lo || v > hi {
                err(
                    &format!("spec.scale.{field}"),
                    format!("must be between {lo} and {hi}, got {v}"),
                );
            }
        };
        range("min", min, 0, 1000);
        range("max", max, 1, 1000);
        range("initial", initial, 1, 1000);
        range("target", target, 1, 100_000);
        range("utilization", utilization, 1, 100);
        range("containerConcurrency", cc, 0, 10_000);
        range("panicWindowPercent", panic_window_percent, 1, 100);
        range("panicThresholdPercent", panic_threshold_percent, 110, 1000);
        if min > max {
            err(
                "spec.scale.min",
                format!("must not exceed spec.scale.max ({min} > {max})"),
            );
        }
        if initial > max {
            err(
                "spec.scale.initial",
                format!("must not exceed spec.scale.max ({initial} > {max})"),
            );
        }
        if initial < min {
            err(
                "spec.scale.initial",
                format!("must be at least spec.scale.min ({initial} < {min})"),
            );
        }

        let mut duration = |field: &str,
                            v: &Option<String>,
                            dv: &Option<String>,
                            builtin: Duration,
                            lo: Duration,
                            hi: Duration|
         -> Duration {
            let Some(text) = v.as_ref().or(dv.as_ref()) else {
                return builtin;
            };
            match parse_duration(text) {
                Ok(d) if d < lo || d > hi => {
                    err(
                        field,
                        format!(
                            "must be between {} and {}, got {text}",
                            format_duration(lo),
                            format_duration(hi)
                        ),
                    );
                    builtin
                }
                Ok(d) => d,
                Err(e) => {
                    err(field, e.to_string());
                    builtin
                }
            }
        };
        let secs = Duration::from_secs;
        let window = duration(
            "spec.scale.window",
            &s.window,
            &d.window,
            secs(60),
            secs(6),
            secs(3600),
        );
        let idle_timeout = duration(
            "spec.scale.idleTimeout",
            &s.idle_timeout,
            &d.idle_timeout,
            secs(30),
            secs(1),
            secs(24 * 3600),
        );
        let scale_down_delay = duration(
            "spec.scale.scaleDownDelay",
            &s.scale_down_delay,
            &d.scale_down_delay,
            Duration::ZERO,
            Duration::ZERO,
            secs(3600),
        );
        let t = spec.timeouts.clone().unwrap_or_default();
        let activation = duration(
            "spec.timeouts.activation",
            &t.activation,
            &defaults.timeouts.activation,
            secs(120),
            secs(1),
            secs(3600),
        );
        let request = duration(
            "spec.timeouts.request",
            &t.request,
            &defaults.timeouts.request,
            secs(300),
            secs(1),
            secs(24 * 3600),
        );

        let mut rate = |field: &str, v: Option<f64>, dv: Option<f64>, builtin: f64| -> f64 {
            let r = v.or(dv).unwrap_or(builtin);
            if !(1.1..=10_000.0).contains(&r) {
                err(
                    &format!("spec.scale.{field}"),
                    format!("must be between 1.1 and 10000, got {r}"),
                );
                return builtin;
            }
            r
        };
        let max_scale_up_rate = rate(
            "maxScaleUpRate",
            s.max_scale_up_rate,
            d.max_scale_up_rate,
            1000.0,
        );
        let max_scale_down_rate = rate(
            "maxScaleDownRate",
            s.max_scale_down_rate,
            d.max_scale_down_rate,
            2.0,
        );

        let capacity = spec
            .queue
            .as_ref()
            .and_then(|q| q.capacity)
            .or(defaults.queue.capacity)
            .unwrap_or(1000);
        if !(1..=100_000).contains(&capacity) {
            err(
                "spec.queue.capacity",
                format!("must be between 1 and 100000, got {capacity}"),
            );
        }

        if !errs.is_empty() {
            return Err(ValidationErrors(errs));
        }
        let panic_window = window.mul_f64(f64::from(panic_window_percent) / 100.0);
        let workload = match scale_target {
            Some(t) => Workload::Target(t),
            None => Workload::Template(Box::new(template)),
        };
        Ok(FunctionConfig {
            workload,
            port,
            hosts,
            scale: ScaleConfig {
                min: min as u32,
                max: max as u32,
                initial: initial as u32,
                metric,
                target: f64::from(target),
                utilization: f64::from(utilization) / 100.0,
                container_concurrency: (cc > 0).then_some(cc as u32),
                window,
                panic_window: panic_window.max(Duration::from_secs(1)),
                panic_threshold: f64::from(panic_threshold_percent) / 100.0,
                idle_timeout,
                scale_down_delay,
                max_scale_up_rate,
                max_scale_down_rate,
            },
            timeouts: TimeoutsConfig {
                activation,
                request,
            },
            queue_capacity: capacity as usize,
        })
    }
}

/// Whether `name` is a valid name for a Deployment or StatefulSet (a DNS subdomain, as
/// the CRD's pattern on `scaleTargetRef.name` says).
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Validates a spec against the built-in defaults.
pub fn validate(spec: &FunctionSpec) -> Result<(), ValidationErrors> {
    FunctionConfig::resolve(spec, &Defaults::default()).map(|_| ())
}

/// Flags shared by every component that reads Functions.
#[derive(Debug, Clone, clap::Args)]
pub struct SharedArgs {
    /// The cluster's DNS domain, for `<name>.<namespace>.svc.<domain>` routing and URLs.
    #[arg(
        long,
        env = "ZEROSCALE_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
    /// A YAML file of cluster-wide defaults for Function specs (`scale`, `timeouts`,
    /// `queue`, in the spec's shape). Built-in defaults apply when unset.
    #[arg(long = "defaults", env = "ZEROSCALE_DEFAULTS_FILE")]
    pub defaults_file: Option<std::path::PathBuf>,
}
