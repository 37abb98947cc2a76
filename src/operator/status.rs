//! The pure "status" step: what a Function's status should say, from what the reconcile
//! saw (its workload: its own Deployment or its scale target; their pods, host and
//! target claims, validation and apply outcomes). The `Active` condition's
//! startup-failure reasons are what the activator fails fast on, so their messages carry
//! the kubelet's own words.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

use crate::api::{CONDITION_ACTIVE, CONDITION_READY, Function, FunctionKey};

/// Why the reconciler could not (fully) reconcile a Function; lands on `Ready=False`.
#[derive(Debug, Clone, PartialEq)]
pub enum Blocker {
    /// The spec failed validation, or the API server refused an object built from it.
    InvalidSpec(String),
    /// Hosts listed in `spec.hosts` that an older Function has (host, owner).
    HostConflict(Vec<(String, FunctionKey)>),
    /// No activator pod is ready, so requests to the Function cannot be served.
    NoActivator,
    /// An object the Function needs exists and belongs to someone else.
    AlreadyExists(String),
    /// Replicas of a new template cannot start while older ones still serve: the
    /// Function answers (Active) but its rollout is stuck, which GitOps tools should see.
    RolloutFailing(Want),
}

/// A condition as the reconciler wants it (the transition time is decided later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

fn want(status: bool, reason: &str, message: impl Into<String>) -> Want {
    Want {
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

/// What the status reads of the workload whose pods serve a Function: the Function's own
/// Deployment, or the Deployment or StatefulSet its `scaleTargetRef` names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadStatus {
    /// Replicas asked for (`spec.replicas`, 1 when unset as the API server defaults it).
    pub desired: i32,
    /// Replicas that exist, ready or not.
    pub replicas: i32,
    pub ready: i32,
    /// Why it stopped progressing (a Deployment's `ProgressDeadlineExceeded` message).
    pub stalled: Option<String>,
}

impl From<&Deployment> for WorkloadStatus {
    fn from(d: &Deployment) -> Self {
        let s = d.status.as_ref();
        let stalled = s
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Progressing"))
            .filter(|c| {
                c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
            .map(|c| {
                c.message
                    .clone()
                    .unwrap_or_else(|| "the Deployment did not progress in time".into())
            });
        Self {
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            replicas: s.and_then(|s| s.replicas).unwrap_or(0),
            ready: s.and_then(|s| s.ready_replicas).unwrap_or(0),
            stalled,
        }
    }
}

impl From<&StatefulSet> for WorkloadStatus {
    fn from(d: &StatefulSet) -> Self {
        let s = d.status.as_ref();
        Self {
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            replicas: s.map(|s| s.replicas).unwrap_or(0),
            ready: s.and_then(|s| s.ready_replicas).unwrap_or(0),
            stalled: None,
        }
    }
}

impl WorkloadStatus {
    /// Whether every replica asked for exists and is ready (nothing starting or stopping,
    /// so nothing for the pods to report).
    pub fn settled(&self) -> bool {
        self.desired == self.ready && self.replicas == self.ready
    }
}

/// Why replicas cannot start, from the pods (kubelet reasons) or the workload.
pub fn startup_failure(workload: Option<&WorkloadStatus>, pods: &[&Pod]) -> Option<Want> {
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        for c in containers {
            let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = match waiting.reason.as_deref() {
                Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName") => {
                    "ImagePullFailure"
                }
                Some("CrashLoopBackOff") => "CrashLoop",
                Some("CreateContainerConfigError" | "CreateContainerError") => {
                    "CreateContainerError"
                }
                _ => continue,
            };
            let mut message = format!(
                "pod {name}: container {}: {}",
                c.name,
                waiting.reason.as_deref().unwrap_or_default()
            );
            if let Some(m) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
                message.push_str(": ");
                message.push_str(m);
            } else if let Some(t) = c
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .filter(|_| reason == "CrashLoop")
            {
                message.push_str(&format!(
                    ": last exit code {}{}",
                    t.exit_code,
                    t.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ));
            }
            return Some(want(false, reason, message));
        }
        for cond in status.conditions.iter().flatten() {
            if cond.type_ == "PodScheduled"
                && cond.status == "False"
                && cond.reason.as_deref() == Some("Unschedulable")
            {
                return Some(want(
                    false,
                    "Unschedulable",
                    format!(
                        "pod {name}: {}",
                        cond.message.as_deref().unwrap_or("cannot be scheduled")
                    ),
                ));
            }
        }
    }
    let stalled = workload?.stalled.as_ref()?;
    Some(want(false, "ProgressDeadlineExceeded", stalled.clone()))
}

/// Replica counts of the workload: (asked for, existing, ready).
pub fn replica_counts(workload: Option<&WorkloadStatus>) -> (i32, i32, i32) {
    workload.map_or((0, 0, 0), |w| (w.desired, w.replicas, w.ready))
}

/// Why a Function cannot run at all, whatever its replicas: its template is invalid, or
/// it does not hold its scale target. Lands on `Active` (and so `Ready`) with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrunnable {
    pub reason: String,
    pub message: String,
}

impl Unrunnable {
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The `Active` condition.
pub fn active(
    workload: Option<&WorkloadStatus>,
    pods: &[&Pod],
    unrunnable: Option<&Unrunnable>,
) -> Want {
    if let Some(u) = unrunnable {
        return want(false, &u.reason, u.message.clone());
    }
    let (desired, _, ready) = replica_counts(workload);
    if ready > 0 {
        return want(
            true,
            "Active",
            format!("{ready} of {desired} replicas ready"),
        );
    }
    if let Some(failure) = startup_failure(workload, pods) {
        return failure;
    }
    if desired == 0 {
        return want(
            false,
            "ScaledToZero",
            "no replicas; the next request wakes the Function",
        );
    }
    want(
        false,
        "Activating",
        format!("waiting for 1 of {desired} replicas to become ready"),
    )
}

/// The `Ready` condition: reconciled and routable (true at zero replicas too).
pub fn ready(blockers: &[Blocker], active: &Want) -> Want {
    let mut reasons = Vec::new();
    for b in blockers {
        match b {
            Blocker::InvalidSpec(m) => return want(false, "InvalidSpec", m.clone()),
            Blocker::HostConflict(hosts) => {
                let list: Vec<String> = hosts
                    .iter()
                    .map(|(h, owner)| format!("host {h} is already routed to Function {owner}"))
                    .collect();
                reasons.push(want(false, "HostConflict", list.join("; ")));
            }
            Blocker::AlreadyExists(m) => reasons.push(want(false, "AlreadyExists", m.clone())),
            Blocker::RolloutFailing(w) => reasons.push(want(false, &w.reason, w.message.clone())),
            Blocker::NoActivator => reasons.push(want(
                false,
                "NoActivator",
                "no activator pod is ready; requests to this Function cannot be served",
            )),
        }
    }
    if let Some(first) = reasons.into_iter().next() {
        return first;
    }
    if !active.status && crate::api::STARTUP_FAILURE_REASONS.contains(&active.reason.as_str()) {
        return want(false, &active.reason, active.message.clone());
    }
    want(true, "Reconciled", "routable through the activator")
}

/// The part of the status the reconciler owns (its server-side apply patch body).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    pub replicas: i32,
    pub ready_replicas: i32,
    pub conditions: Vec<Condition>,
}

/// Builds the condition, keeping the previous transition time unless the status flips.
pub fn condition(
    type_: &str,
    want: &Want,
    previous: Option<&Condition>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let status = if want.status { "True" } else { "False" };
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: want.reason.clone(),
        // The API server caps condition messages at 32768 bytes.
        message: truncate(&want.message, 32 * 1024 - 1),
        observed_generation: generation,
        last_transition_time,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The operator's status for a Function; `selector` selects the pods serving it (none
/// while a Function does not hold its scale target).
pub fn operator_status(
    function: &Function,
    cluster_domain: &str,
    workload: Option<&WorkloadStatus>,
    selector: Option<String>,
    ready_want: &Want,
    active_want: &Want,
    now: Time,
) -> OperatorStatus {
    let generation = function.metadata.generation;
    let (_, replicas, ready_replicas) = replica_counts(workload);
    OperatorStatus {
        observed_generation: generation,
        url: function.url(cluster_domain),
        selector,
        replicas,
        ready_replicas,
        conditions: vec![
            condition(
                CONDITION_READY,
                ready_want,
                function.condition(CONDITION_READY),
                generation,
                now.clone(),
            ),
            condition(
                CONDITION_ACTIVE,
                active_want,
                function.condition(CONDITION_ACTIVE),
                generation,
                now,
            ),
        ],
    }
}

/// Whether the live status already says all of `want` (then no write is needed).
pub fn status_up_to_date(function: &Function, want: &OperatorStatus) -> bool {
    let Some(s) = function.status.as_ref() else {
        return false;
    };
    s.observed_generation == want.observed_generation
        && s.url.as_deref() == Some(want.url.as_str())
        && s.selector == want.selector
        && s.replicas.unwrap_or(0) == want.replicas
        && s.ready_replicas.unwrap_or(0) == want.ready_replicas
        && want
            .conditions
            .iter()
            .all(|c| s.conditions.iter().any(|have| have == c))
}
