//! What the stand-in knows about a pod's containers (the model the container supervisors
//! update) and the pod `status` built from it the way the kubelet builds it: the phase
//! (`getPhase`), the PodScheduled / Initialized / ContainersReady / Ready conditions and
//! the container statuses. Pure code.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// One finished run of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `StartError`...
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    pub container_id: Option<String>,
}

impl Exit {
    /// A process's end as the kubelet reports it: a signal is exit code 128 + signal.
    pub fn of_process(
        code: Option<i32>,
        signal: Option<i32>,
        started_at: Timestamp,
        container_id: String,
    ) -> Self {
        let exit_code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
        Self {
            exit_code,
            signal: None,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: Some(started_at),
            finished_at: Timestamp::now(),
            container_id: Some(container_id),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated(Exit),
}

impl RunState {
    pub fn waiting(reason: &str, message: Option<String>) -> Self {
        RunState::Waiting {
            reason: reason.into(),
            message,
        }
    }
}

/// One container as the stand-in runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRun {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub state: RunState,
    pub last: Option<Exit>,
    pub restart_count: i32,
    /// The startup probe passed (or there is none) in the current run.
    pub started: bool,
    /// The readiness probe says ready (or there is none) in the current run.
    pub ready: bool,
    pub container_id: Option<String>,
}

impl ContainerRun {
    pub fn new(name: &str, image: &str, waiting_reason: &str) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            image_id: image_id(image),
            state: RunState::waiting(waiting_reason, None),
            last: None,
            restart_count: 0,
            started: false,
            ready: false,
            container_id: None,
        }
    }

    fn running(&self) -> bool {
        matches!(self.state, RunState::Running { .. })
    }

    fn succeeded(&self) -> bool {
        matches!(&self.state, RunState::Terminated(e) if e.exit_code == 0)
    }
}

/// An image ID for a container status: there are no image digests here, so a stable
/// made-up one.
pub fn image_id(image: &str) -> String {
    format!("standin://{image}")
}

/// The pod as the stand-in runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRun {
    pub pod_ips: Vec<String>,
    pub host_ip: String,
    pub start_time: Timestamp,
    pub init: Vec<ContainerRun>,
    pub containers: Vec<ContainerRun>,
    /// Every init container completed.
    pub initialized: bool,
    /// Set when the pod ended for good (an init container failed with restartPolicy
    /// Never, or the pod was stopped): its final phase.
    pub final_phase: Option<&'static str>,
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn state(s: &RunState) -> ContainerState {
    match s {
        RunState::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        RunState::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(time(*started_at)),
            }),
            ..Default::default()
        },
        RunState::Terminated(e) => terminated(e),
    }
}

fn terminated(e: &Exit) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            container_id: e.container_id.clone(),
            exit_code: e.exit_code,
            finished_at: Some(time(e.finished_at)),
            message: e.message.clone(),
            reason: Some(e.reason.clone()),
            signal: e.signal,
            started_at: e.started_at.map(time),
        }),
        ..Default::default()
    }
}

fn container_status(c: &ContainerRun) -> ContainerStatus {
    let running = c.running();
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        container_id: c.container_id.clone(),
        ready: running && c.started && c.ready,
        started: Some(running && c.started),
        restart_count: c.restart_count,
        state: Some(state(&c.state)),
        last_state: Some(c.last.as_ref().map(terminated).unwrap_or_default()),
        ..Default::default()
    }
}

/// The kubelet's `getPhase`.
pub fn phase(run: &PodRun, restart_policy: &str) -> &'static str {
    if let Some(p) = run.final_phase {
        return p;
    }
    if !run.initialized {
        return "Pending";
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in &run.containers {
        match &c.state {
            RunState::Running { .. } => running += 1,
            RunState::Terminated(e) => {
                stopped += 1;
                if e.exit_code == 0 {
                    succeeded += 1;
                }
            }
            RunState::Waiting { .. } if c.last.is_some() => stopped += 1,
            RunState::Waiting { .. } => waiting += 1,
        }
    }
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 {
        return match restart_policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "OnFailure" => "Running",
            _ => "Failed",
        };
    }
    "Pending"
}

/// The pod's status. Conditions keep their `lastTransitionTime` while their status does
/// not change; conditions of other types (readiness gates) are kept as they are.
pub fn pod_status(pod: &Pod, run: &PodRun, now: Timestamp) -> PodStatus {
    let spec = pod.spec.as_ref();
    let restart_policy = spec
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    let phase = phase(run, restart_policy);
    let previous = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();

    let unready: Vec<&str> = run
        .containers
        .iter()
        .filter(|c| !(c.running() && c.started && c.ready))
        .map(|c| c.name.as_str())
        .collect();
    let incomplete: Vec<&str> = run
        .init
        .iter()
        .filter(|c| !c.succeeded())
        .map(|c| c.name.as_str())
        .collect();
    let completed = phase == "Succeeded";
    let containers_ready = if completed {
        cond(false, Some("PodCompleted"), None)
    } else if unready.is_empty() {
        cond(true, None, None)
    } else {
        cond(
            false,
            Some("ContainersNotReady"),
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    };
    let gates_unready: Vec<&str> = spec
        .and_then(|s| s.readiness_gates.as_ref())
        .into_iter()
        .flatten()
        .map(|g| g.condition_type.as_str())
        .filter(|t| !previous.iter().any(|c| c.type_ == *t && c.status == "True"))
        .collect();
    let ready = if containers_ready.0 && !gates_unready.is_empty() {
        cond(
            false,
            Some("ReadinessGatesNotReady"),
            Some(format!(
                "corresponding condition of pod readiness gate \"{}\" does not exist.",
                gates_unready.join(" ")
            )),
        )
    } else {
        containers_ready.clone()
    };
    let initialized = if run.initialized || completed {
        cond(true, completed.then_some("PodCompleted"), None)
    } else {
        cond(
            false,
            Some("ContainersNotInitialized"),
            Some(format!(
                "containers with incomplete status: [{}]",
                incomplete.join(" ")
            )),
        )
    };
    let ours = [
        ("Initialized", initialized),
        ("Ready", ready),
        ("ContainersReady", containers_ready),
        ("PodScheduled", cond(true, None, None)),
    ];
    let mut conditions: Vec<PodCondition> = previous
        .iter()
        .filter(|c| !ours.iter().any(|(t, _)| *t == c.type_))
        .cloned()
        .collect();
    for (type_, (ok, reason, message)) in ours {
        let status = if ok { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| time(now));
        conditions.push(PodCondition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.map(Into::into),
            message,
            last_transition_time: Some(since),
            ..Default::default()
        });
    }

    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(run.host_ip.clone()),
        host_ips: Some(vec![HostIP {
            ip: run.host_ip.clone(),
        }]),
        pod_ip: run.pod_ips.first().cloned(),
        pod_ips: (!run.pod_ips.is_empty()).then(|| {
            run.pod_ips
                .iter()
                .map(|ip| PodIP { ip: ip.clone() })
                .collect()
        }),
        start_time: Some(time(run.start_time)),
        init_container_statuses: (!run.init.is_empty())
            .then(|| run.init.iter().map(container_status).collect()),
        container_statuses: Some(run.containers.iter().map(container_status).collect()),
        ..Default::default()
    }
}

fn cond(
    ok: bool,
    reason: Option<&'static str>,
    message: Option<String>,
) -> (bool, Option<&'static str>, Option<String>) {
    (ok, reason, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(extra_spec: serde_json::Value) -> Pod {
        let mut spec =
            json!({"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "x"}]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra_spec.as_object().unwrap().clone());
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": spec}))
            .unwrap()
    }

    fn run() -> PodRun {
        PodRun {
            pod_ips: vec!["10.244.0.5".into()],
            host_ip: "10.244.0.1".into(),
            start_time: Timestamp::UNIX_EPOCH,
            init: vec![],
            containers: vec![
                ContainerRun::new("a", "x", "ContainerCreating"),
                ContainerRun::new("b", "x", "ContainerCreating"),
            ],
            initialized: true,
            final_phase: None,
        }
    }

    fn start(c: &mut ContainerRun, ready: bool) {
        c.state = RunState::Running {
            started_at: Timestamp::UNIX_EPOCH,
        };
        c.started = true;
        c.ready = ready;
    }

    fn exit(code: i32) -> Exit {
        Exit {
            exit_code: code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: None,
            finished_at: Timestamp::UNIX_EPOCH,
            container_id: None,
        }
    }

    fn condition<'a>(s: &'a PodStatus, t: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
    }

    #[test]
    fn phases_follow_get_phase() {
        let mut r = run();
        assert_eq!(phase(&r, "Always"), "Pending");
        start(&mut r.containers[0], true);
        assert_eq!(phase(&r, "Always"), "Pending", "b still waiting");
        start(&mut r.containers[1], false);
        assert_eq!(phase(&r, "Always"), "Running");
        r.containers[1].state = RunState::waiting("CrashLoopBackOff", None);
        r.containers[1].last = Some(exit(1));
        assert_eq!(
            phase(&r, "Always"),
            "Running",
            "a crash-looping container is stopped, not waiting"
        );
        r.containers[0].state = RunState::Terminated(exit(0));
        r.containers[1].state = RunState::Terminated(exit(0));
        assert_eq!(phase(&r, "Never"), "Succeeded");
        assert_eq!(phase(&r, "Always"), "Running");
        r.containers[1].state = RunState::Terminated(exit(2));
        assert_eq!(phase(&r, "Never"), "Failed");
        assert_eq!(phase(&r, "OnFailure"), "Running");
        r.initialized = false;
        assert_eq!(phase(&r, "Never"), "Pending");
        r.final_phase = Some("Failed");
        assert_eq!(phase(&r, "Never"), "Failed");
    }

    #[test]
    fn ready_only_when_every_container_is_ready() {
        let p = pod(json!({}));
        let mut r = run();
        start(&mut r.containers[0], true);
        start(&mut r.containers[1], false);
        let s = pod_status(&p, &r, Timestamp::UNIX_EPOCH);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let ready = condition(&s, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("ContainersNotReady"));
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [b]")
        );
        assert_eq!(condition(&s, "PodScheduled").status, "True");
        assert_eq!(condition(&s, "Initialized").status, "True");
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.0.5"));
        assert_eq!(s.host_ip.as_deref(), Some("10.244.0.1"));
        let b = &s.container_statuses.as_ref().unwrap()[1];
        assert!(!b.ready);
        assert_eq!(b.started, Some(true));
        assert!(b.state.as_ref().unwrap().running.is_some());

        r.containers[1].ready = true;
        let s = pod_status(&p, &r, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&s, "Ready").status, "True");
        assert_eq!(condition(&s, "ContainersReady").status, "True");
    }

    #[test]
    fn transition_times_survive_unchanged_conditions() {
        let mut p = pod(json!({}));
        let mut r = run();
        start(&mut r.containers[0], true);
        start(&mut r.containers[1], true);
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = t0 + jiff::SignedDuration::from_secs(60);
        let first = pod_status(&p, &r, t0);
        p.status = Some(first);
        let second = pod_status(&p, &r, t1);
        assert_eq!(
            condition(&second, "Ready").last_transition_time,
            Some(Time(t0))
        );
        r.containers[0].ready = false;
        let third = pod_status(&p, &r, t1);
        assert_eq!(
            condition(&third, "Ready").last_transition_time,
            Some(Time(t1))
        );
    }

    #[test]
    fn readiness_gates_hold_ready_back_and_foreign_conditions_stay() {
        let mut p = pod(json!({"readinessGates": [{"conditionType": "example.com/lb"}]}));
        let mut r = run();
        start(&mut r.containers[0], true);
        start(&mut r.containers[1], true);
        let s = pod_status(&p, &r, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&s, "Ready").status, "False");
        assert_eq!(
            condition(&s, "Ready").reason.as_deref(),
            Some("ReadinessGatesNotReady")
        );
        p.status = Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "example.com/lb".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let s = pod_status(&p, &r, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&s, "Ready").status, "True");
        assert_eq!(condition(&s, "example.com/lb").status, "True");
    }

    #[test]
    fn restarts_show_last_state_and_waiting_reason() {
        let p = pod(json!({}));
        let mut r = run();
        r.containers[0].restart_count = 3;
        r.containers[0].last = Some(exit(1));
        r.containers[0].state = RunState::waiting(
            "CrashLoopBackOff",
            Some("back-off 20s restarting failed container=a pod=p_ns(u)".into()),
        );
        let s = pod_status(&p, &r, Timestamp::UNIX_EPOCH);
        let a = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(a.restart_count, 3);
        let waiting = a.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
        let last = a.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(last.exit_code, 1);
        assert_eq!(last.reason.as_deref(), Some("Error"));
        assert_eq!(a.image_id, "standin://x");
    }

    #[test]
    fn init_containers_gate_initialized() {
        let p = pod(json!({"initContainers": [{"name": "setup", "image": "x"}]}));
        let mut r = run();
        r.init = vec![ContainerRun::new("setup", "x", "PodInitializing")];
        r.initialized = false;
        let s = pod_status(&p, &r, Timestamp::UNIX_EPOCH);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let init = condition(&s, "Initialized");
        assert_eq!(init.status, "False");
        assert_eq!(
            init.message.as_deref(),
            Some("containers with incomplete status: [setup]")
        );
        assert_eq!(s.init_container_statuses.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn signals_are_128_plus() {
        let e = Exit::of_process(None, Some(15), Timestamp::UNIX_EPOCH, "id".into());
        assert_eq!(e.exit_code, 143);
        assert_eq!(e.reason, "Error");
        let e = Exit::of_process(Some(0), None, Timestamp::UNIX_EPOCH, "id".into());
        assert_eq!(e.reason, "Completed");
    }
}
