//! The operator's pure steps from fixtures: the objects a Function owns (names, labels,
//! selectors, ports, owner references, who sets replicas), drift detection, the status
//! conditions the activator and GitOps tools read, and the activator endpoint set.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    FieldsV1, ManagedFieldsEntry, ObjectMeta, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use zeroscale::api::{Defaults, FUNCTION_LABEL, Function, FunctionConfig, FunctionKey};
use zeroscale::operator::activators::aggregate;
use zeroscale::operator::build::{
    self, ActivatorEndpoint, ActivatorEndpoints, FIELD_MANAGER, Replicas, up_to_date,
};
use zeroscale::operator::status::{self, Blocker};

fn hello() -> Function {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello.yaml"))
        .expect("examples/hello.yaml");
    let mut f: Function = serde_yaml::from_str(&text).expect("a Function");
    f.metadata.uid = Some("0b7d1f4e-1111-2222-3333-444455556666".into());
    f.metadata.generation = Some(3);
    f
}

fn config(f: &Function) -> FunctionConfig {
    FunctionConfig::resolve(&f.spec, &Defaults::default()).expect("valid")
}

fn activators() -> ActivatorEndpoints {
    ActivatorEndpoints {
        drain: Some(build::DrainHook {
            host: "10.96.0.20".into(),
            port: 80,
        }),
        port: 8080,
        address_type: "IPv4".into(),
        endpoints: vec![
            ActivatorEndpoint {
                ip: "10.1.0.7".into(),
                node_name: Some("node-a".into()),
                zone: Some("zone-1".into()),
                target_ref: None,
            },
            ActivatorEndpoint {
                ip: "10.1.0.9".into(),
                node_name: None,
                zone: None,
                target_ref: None,
            },
        ],
    }
}

fn labels(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    meta.labels.as_ref().expect("labels")
}

#[test]
fn deployment_selects_exactly_the_functions_pods_and_is_owned_by_it() {
    let f = hello();
    let d = build::build(&f, &config(&f), Replicas::Create(0), Some(&activators()))
        .unwrap()
        .deployment;
    assert_eq!(d.metadata.name.as_deref(), Some("hello"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("default"));
    let spec = d.spec.as_ref().unwrap();
    let selector = spec.selector.match_labels.as_ref().unwrap();
    assert_eq!(
        selector,
        &BTreeMap::from([(FUNCTION_LABEL.to_string(), "hello".to_string())])
    );
    let template_labels = labels(spec.template.metadata.as_ref().unwrap());
    for (k, v) in selector {
        assert_eq!(
            template_labels.get(k),
            Some(v),
            "template carries the selector"
        );
    }
    // The user's container is used as written.
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some("python:3.12-alpine"));
    assert!(container.readiness_probe.is_some());

    let owners = d.metadata.owner_references.as_ref().unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].kind, "Function");
    assert_eq!(owners[0].api_version, "zeroscale.dev/v1alpha1");
    assert_eq!(owners[0].name, "hello");
    assert_eq!(owners[0].uid, f.metadata.uid.clone().unwrap());
    assert_eq!(owners[0].controller, Some(true));
}

#[test]
fn replicas_are_set_on_create_only() {
    let f = hello();
    let c = config(&f);
    let replicas = |r| {
        build::build(&f, &c, r, None)
            .unwrap()
            .deployment
            .spec
            .unwrap()
            .replicas
    };
    // Created at scale.min (0 for hello: it starts idle).
    assert_eq!(Replicas::decide(None, c.scale.min), Replicas::Create(0));
    assert_eq!(replicas(Replicas::Create(0)), Some(0));
    // Afterwards the autoscaler and activator own them: left out of the applied object.
    assert_eq!(replicas(Replicas::Omit), None);
    // A template edit must not change the hash because of replicas.
    let a = build::build(&f, &c, Replicas::Create(0), None).unwrap();
    let b = build::build(&f, &c, Replicas::Keep(4), None).unwrap();
    assert_eq!(
        a.deployment.metadata.annotations,
        b.deployment.metadata.annotations
    );
}

fn deployment_managed_by(entries: &[(&str, &str, bool)], replicas: i32) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            name: Some("hello".into()),
            managed_fields: Some(
                entries
                    .iter()
                    .map(|(manager, operation, owns_replicas)| ManagedFieldsEntry {
                        manager: Some(manager.to_string()),
                        operation: Some(operation.to_string()),
                        fields_v1: Some(FieldsV1(if *owns_replicas {
                            serde_json::json!({"f:spec": {"f:replicas": {}, "f:template": {}}})
                        } else {
                            serde_json::json!({"f:spec": {"f:template": {}}})
                        })),
                        ..ManagedFieldsEntry::default()
                    })
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::apps::v1::DeploymentSpec {
            replicas: Some(replicas),
            ..Default::default()
        }),
        status: None,
    }
}

#[test]
fn the_operator_never_resets_replicas_someone_else_set() {
    // Only the operator's apply owns replicas (never scaled since creation): keep
    // sending the live value, or server-side apply would reset them to 1.
    let untouched = deployment_managed_by(&[(FIELD_MANAGER, "Apply", true)], 0);
    assert_eq!(Replicas::decide(Some(&untouched), 0), Replicas::Keep(0));
    // The activator woke it through the scale subresource: hands off.
    let woken = deployment_managed_by(
        &[
            (FIELD_MANAGER, "Apply", false),
            ("zeroscale", "Update", true),
        ],
        3,
    );
    assert_eq!(Replicas::decide(Some(&woken), 0), Replicas::Omit);
    let shared = deployment_managed_by(
        &[
            (FIELD_MANAGER, "Apply", true),
            ("zeroscale", "Update", true),
        ],
        3,
    );
    assert_eq!(Replicas::decide(Some(&shared), 0), Replicas::Omit);
}

#[test]
fn private_service_selects_the_pods_on_the_function_port() {
    let f = hello();
    let s = build::build(&f, &config(&f), Replicas::Omit, None)
        .unwrap()
        .private_service;
    assert_eq!(s.metadata.name.as_deref(), Some("hello-private"));
    assert_eq!(
        labels(&s.metadata)
            .get("zeroscale.dev/service")
            .map(String::as_str),
        Some("private"),
        "the platform finds the pod slices by this label (copied onto slices)"
    );
    assert_eq!(
        labels(&s.metadata).get(FUNCTION_LABEL).map(String::as_str),
        Some("hello")
    );
    let spec = s.spec.unwrap();
    assert_eq!(
        spec.selector,
        Some(BTreeMap::from([(
            FUNCTION_LABEL.to_string(),
            "hello".to_string()
        )]))
    );
    let port = &spec.ports.unwrap()[0];
    assert_eq!(port.name.as_deref(), Some("http"));
    assert_eq!(port.port, 8080);
    assert_eq!(port.target_port, Some(IntOrString::Int(8080)));
    assert!(s.metadata.owner_references.unwrap()[0].controller == Some(true));
}

#[test]
fn public_service_has_no_selector_and_answers_on_port_80() {
    let f = hello();
    let s = build::build(&f, &config(&f), Replicas::Omit, None)
        .unwrap()
        .public_service;
    assert_eq!(s.metadata.name.as_deref(), Some("hello"));
    let spec = s.spec.unwrap();
    assert_eq!(
        spec.selector, None,
        "endpoints come from the operator's slice"
    );
    let port = &spec.ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("http"), 80));
    assert_ne!(
        labels(&s.metadata)
            .get("zeroscale.dev/service")
            .map(String::as_str),
        Some("private")
    );
}

fn pod_spec(d: &Deployment) -> &k8s_openapi::api::core::v1::PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod spec")
}

/// A replica being stopped (scale-down, rollout, deletion) asks the activators to drain
/// it first: its preStop calls the activator Service, and the grace period covers the
/// longest request the Function allows on top of the app's own shutdown time.
#[test]
fn the_serving_container_drains_through_the_activators_before_it_stops() {
    let f = hello();
    let d = build::build(&f, &config(&f), Replicas::Create(0), Some(&activators()))
        .unwrap()
        .deployment;
    let spec = pod_spec(&d);
    let hook = spec.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|p| p.http_get.as_ref())
        .expect("a preStop httpGet");
    assert_eq!(hook.host.as_deref(), Some("10.96.0.20"));
    assert_eq!(hook.port, IntOrString::Int(80));
    assert_eq!(
        hook.path.as_deref(),
        Some("/.zeroscale/drain/default/hello")
    );
    // 30 s (Kubernetes' default) for the app, plus timeouts.request (300 s by default).
    assert_eq!(spec.termination_grace_period_seconds, Some(330));

    // The user's own grace period and request timeout are what it adds up from.
    let mut f = hello();
    edit_template(&mut f, |t| {
        t["spec"]["terminationGracePeriodSeconds"] = serde_json::json!(5)
    });
    f.spec.timeouts = Some(zeroscale::api::TimeoutsSpec {
        activation: None,
        request: Some("20s".into()),
    });
    let d = build::build(&f, &config(&f), Replicas::Create(0), Some(&activators()))
        .unwrap()
        .deployment;
    assert_eq!(pod_spec(&d).termination_grace_period_seconds, Some(25));
}

#[test]
fn a_preexisting_pre_stop_is_kept_and_no_activator_address_means_no_hook() {
    let mut f = hello();
    edit_template(&mut f, |t| {
        t["spec"]["containers"][0]["lifecycle"] =
            serde_json::json!({"preStop": {"exec": {"command": ["/bin/drain"]}}})
    });
    let d = build::build(&f, &config(&f), Replicas::Create(0), Some(&activators()))
        .unwrap()
        .deployment;
    let pre_stop = pod_spec(&d).containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .expect("the user's preStop");
    assert!(pre_stop.http_get.is_none() && pre_stop.exec.is_some());
    assert_eq!(pod_spec(&d).termination_grace_period_seconds, None);

    let f = hello();
    let mut no_address = activators();
    no_address.drain = None;
    let d = build::build(&f, &config(&f), Replicas::Create(0), Some(&no_address))
        .unwrap()
        .deployment;
    assert!(pod_spec(&d).containers[0].lifecycle.is_none());
}

/// The API server refuses an object with a label value it can't carry (the first landing's
/// `managed-by: zeroscale.dev/operator` made every Function unroutable on a cluster).
#[test]
fn every_label_and_annotation_of_every_object_is_one_the_api_server_accepts() {
    use kube::Resource;
    let mut f = hello();
    // The longest name a Function may have: its labels carry it.
    let longest = format!("f{}", "o".repeat(build::MAX_NAME_LEN - 1));
    f.metadata.name = Some(longest.clone());
    let desired = build::build(&f, &config(&f), Replicas::Create(0), Some(&activators())).unwrap();
    let template = desired
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.clone())
        .expect("template metadata");
    let metas: Vec<(&str, &ObjectMeta)> = vec![
        ("Deployment", desired.deployment.meta()),
        ("pod template", &template),
        ("private Service", desired.private_service.meta()),
        ("public Service", desired.public_service.meta()),
        (
            "activator EndpointSlice",
            desired.activator_slice.as_ref().expect("a slice").meta(),
        ),
    ];
    for (what, meta) in metas {
        for (k, v) in meta.labels.iter().flatten() {
            assert!(build::is_label_key(k), "{what}: label key {k:?}");
            assert!(build::is_label_value(v), "{what}: label {k}={v:?}");
        }
        for k in meta.annotations.iter().flatten().map(|(k, _)| k) {
            assert!(build::is_label_key(k), "{what}: annotation key {k:?}");
        }
    }
    for bad in ["zeroscale.dev/operator", "-a", "a-", &"x".repeat(64)] {
        assert!(!build::is_label_value(bad), "{bad:?} must be refused");
    }
    for good in [
        "",
        "operator.zeroscale.dev",
        "endpointslice-controller.k8s.io",
        "A_b-1",
    ] {
        assert!(build::is_label_value(good), "{good:?} must be accepted");
    }
}

#[test]
fn activator_slice_points_the_public_service_at_the_activators() {
    let f = hello();
    let slice = build::build(&f, &config(&f), Replicas::Omit, Some(&activators()))
        .unwrap()
        .activator_slice
        .expect("a slice once the activators are known");
    let l = labels(&slice.metadata);
    assert_eq!(
        l.get("kubernetes.io/service-name").map(String::as_str),
        Some("hello")
    );
    assert_eq!(
        l.get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str),
        Some(build::SLICE_MANAGER)
    );
    assert_ne!(
        build::SLICE_MANAGER,
        "endpointslice-controller.k8s.io",
        "the built-in controller would delete a slice that claims to be its own"
    );
    assert_ne!(
        l.get("zeroscale.dev/service").map(String::as_str),
        Some("private")
    );
    assert_eq!(slice.address_type, "IPv4");
    let ports = slice.ports.unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        ports[0].name.as_deref(),
        Some("http"),
        "equals the Service's port name"
    );
    assert_eq!(ports[0].port, Some(8080), "the activator's traffic port");
    let addresses: Vec<&str> = slice
        .endpoints
        .iter()
        .map(|e| e.addresses[0].as_str())
        .collect();
    assert_eq!(addresses, vec!["10.1.0.7", "10.1.0.9"]);
    assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("node-a"));
    assert_eq!(slice.endpoints[0].zone.as_deref(), Some("zone-1"));
    assert!(slice.metadata.owner_references.unwrap()[0].controller == Some(true));

    // Before the activator slices are listed once, nothing is written.
    assert!(
        build::build(&f, &config(&f), Replicas::Omit, None)
            .unwrap()
            .activator_slice
            .is_none()
    );
}

#[test]
fn a_function_not_stored_yet_cannot_be_built() {
    let mut f = hello();
    f.metadata.uid = None;
    assert!(build::build(&f, &config(&f), Replicas::Omit, None).is_err());
}

#[test]
fn drift_is_seen_and_server_defaults_are_not() {
    let f = hello();
    let desired = build::build(&f, &config(&f), Replicas::Omit, None)
        .unwrap()
        .deployment;
    // What the API server stores: ours plus defaults and bookkeeping.
    let mut live = serde_json::to_value(&desired).unwrap();
    live["metadata"]["resourceVersion"] = "42".into();
    live["metadata"]["uid"] = "abc".into();
    live["spec"]["replicas"] = 2.into();
    live["spec"]["progressDeadlineSeconds"] = 600.into();
    live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent".into();
    live["spec"]["template"]["spec"]["restartPolicy"] = "Always".into();
    live["status"] = serde_json::json!({"replicas": 2, "readyReplicas": 2});
    let live: Deployment = serde_json::from_value(live).unwrap();
    assert!(up_to_date(&desired, Some(&live)));
    assert!(!up_to_date(&desired, None), "a missing object is drift");

    // Someone edits the image.
    let mut edited = live.clone();
    edited
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .image = Some("evil:latest".into());
    assert!(!up_to_date(&desired, Some(&edited)));

    // The user removed something from the spec: the applied hash differs.
    let mut f2 = hello();
    edit_template(&mut f2, |t| {
        t["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("readinessProbe");
    });
    let desired2 = build::build(&f2, &config(&f2), Replicas::Omit, None)
        .unwrap()
        .deployment;
    assert!(!up_to_date(&desired2, Some(&live)));
}

fn pod(waiting: Option<(&str, &str)>, unschedulable: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("hello-abc".into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(FUNCTION_LABEL.into(), "hello".into())])),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(PodStatus {
            container_statuses: waiting.map(|(reason, message)| {
                vec![ContainerStatus {
                    name: "app".into(),
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some(reason.into()),
                            message: Some(message.into()),
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]
            }),
            conditions: unschedulable.map(|m| {
                vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: Some("Unschedulable".into()),
                    message: Some(m.into()),
                    ..PodCondition::default()
                }]
            }),
            ..PodStatus::default()
        }),
    }
}

fn deployment(replicas: i32, ready: i32, progress_deadline: bool) -> Deployment {
    Deployment {
        metadata: ObjectMeta::default(),
        spec: Some(k8s_openapi::api::apps::v1::DeploymentSpec {
            replicas: Some(replicas),
            ..Default::default()
        }),
        status: Some(DeploymentStatus {
            replicas: Some(replicas),
            ready_replicas: Some(ready),
            conditions: progress_deadline.then(|| {
                vec![DeploymentCondition {
                    type_: "Progressing".into(),
                    status: "False".into(),
                    reason: Some("ProgressDeadlineExceeded".into()),
                    message: Some("ReplicaSet \"hello-5d\" has timed out progressing.".into()),
                    ..DeploymentCondition::default()
                }]
            }),
            ..DeploymentStatus::default()
        }),
    }
}

#[test]
fn startup_failures_carry_the_kubelet_message() {
    let d = deployment(1, 0, false);
    let cases = [
        (
            pod(
                Some(("ImagePullBackOff", "Back-off pulling image \"nope:1\"")),
                None,
            ),
            "ImagePullFailure",
            "Back-off pulling image \"nope:1\"",
        ),
        (
            pod(Some(("ErrImagePull", "manifest unknown")), None),
            "ImagePullFailure",
            "manifest unknown",
        ),
        (
            pod(
                Some((
                    "CrashLoopBackOff",
                    "back-off 40s restarting failed container",
                )),
                None,
            ),
            "CrashLoop",
            "back-off 40s restarting failed container",
        ),
        (
            pod(
                Some(("CreateContainerConfigError", "secret \"db\" not found")),
                None,
            ),
            "CreateContainerError",
            "secret \"db\" not found",
        ),
        (
            pod(None, Some("0/3 nodes are available: 3 Insufficient cpu.")),
            "Unschedulable",
            "Insufficient cpu",
        ),
    ];
    for (p, reason, message) in cases {
        let active = status::active(Some(&workload(&d)), &[&p], None);
        assert!(!active.status);
        assert_eq!(active.reason, reason);
        assert!(active.message.contains(message), "{}", active.message);
        assert!(zeroscale::api::STARTUP_FAILURE_REASONS.contains(&active.reason.as_str()));
        // A Function that cannot start is not Ready either (GitOps health).
        assert!(!status::ready(&[], &active).status);
    }
    let stuck = status::active(Some(&workload(&deployment(1, 0, true))), &[], None);
    assert_eq!(stuck.reason, "ProgressDeadlineExceeded");
    assert!(stuck.message.contains("timed out progressing"));
}

fn workload(d: &Deployment) -> status::WorkloadStatus {
    d.into()
}

#[test]
fn scaled_to_zero_is_ready_and_not_a_failure() {
    let active = status::active(Some(&workload(&deployment(0, 0, false))), &[], None);
    assert_eq!(
        (active.status, active.reason.as_str()),
        (false, "ScaledToZero")
    );
    assert!(!zeroscale::api::STARTUP_FAILURE_REASONS.contains(&active.reason.as_str()));
    let ready = status::ready(&[], &active);
    assert!(ready.status, "Ready is true at zero");

    let waking = status::active(
        Some(&workload(&deployment(1, 0, false))),
        &[&pod(None, None)],
        None,
    );
    assert_eq!(
        (waking.status, waking.reason.as_str()),
        (false, "Activating")
    );
    let up = status::active(Some(&workload(&deployment(2, 2, false))), &[], None);
    assert_eq!((up.status, up.reason.as_str()), (true, "Active"));
    // Ready replicas win over a failing one: requests are still served...
    let failing = pod(Some(("CrashLoopBackOff", "back-off restarting")), None);
    let d = deployment(2, 1, false);
    let some = status::active(Some(&workload(&d)), &[&failing], None);
    assert!(some.status);
    // ...but the stuck rollout shows on Ready, as GitOps health checks expect.
    let stuck = status::startup_failure(Some(&workload(&d)), &[&failing]).unwrap();
    let ready = status::ready(&[Blocker::RolloutFailing(stuck)], &some);
    assert_eq!((ready.status, ready.reason.as_str()), (false, "CrashLoop"));
}

#[test]
fn ready_reports_invalid_specs_and_host_conflicts() {
    let idle = status::active(Some(&workload(&deployment(0, 0, false))), &[], None);
    let r = status::ready(
        &[Blocker::InvalidSpec(
            "spec.scale.min: must not exceed spec.scale.max (5 > 2)".into(),
        )],
        &idle,
    );
    assert_eq!((r.status, r.reason.as_str()), (false, "InvalidSpec"));
    assert!(r.message.contains("spec.scale.min"));
    let r = status::ready(
        &[Blocker::HostConflict(vec![(
            "api.example.com".into(),
            FunctionKey::new("team-a", "old"),
        )])],
        &idle,
    );
    assert_eq!((r.status, r.reason.as_str()), (false, "HostConflict"));
    assert!(r.message.contains("api.example.com") && r.message.contains("team-a/old"));
}

#[test]
fn transition_time_moves_only_when_the_status_flips() {
    let mut f = hello();
    let t0 = Time(jiff::Timestamp::from_second(1_700_000_000).unwrap());
    let t1 = Time(jiff::Timestamp::from_second(1_700_000_100).unwrap());
    let idle = status::active(Some(&workload(&deployment(0, 0, false))), &[], None);
    let ready = status::ready(&[], &idle);
    let s0 = status::operator_status(&f, "cluster.local", None, None, &ready, &idle, t0.clone());
    assert_eq!(s0.url, "http://hello.default.svc.cluster.local");
    assert_eq!(s0.observed_generation, Some(3));
    f.status = Some(zeroscale::api::FunctionStatus {
        conditions: s0.conditions.clone(),
        observed_generation: s0.observed_generation,
        url: Some(s0.url.clone()),
        replicas: Some(0),
        ready_replicas: Some(0),
        ..Default::default()
    });
    assert!(status::status_up_to_date(&f, &s0));
    // Same statuses later: nothing changes, no write needed.
    let s1 = status::operator_status(&f, "cluster.local", None, None, &ready, &idle, t1.clone());
    assert_eq!(s1, s0);
    assert!(status::status_up_to_date(&f, &s1));
    // Active flips to True: its transition time moves, Ready's does not.
    let up = status::active(Some(&workload(&deployment(1, 1, false))), &[], None);
    let s2 = status::operator_status(
        &f,
        "cluster.local",
        Some(&workload(&deployment(1, 1, false))),
        None,
        &ready,
        &up,
        t1.clone(),
    );
    assert_eq!(s2.conditions[0].last_transition_time, t0);
    assert_eq!(s2.conditions[1].last_transition_time, t1);
    assert!(!status::status_up_to_date(&f, &s2));
}

fn activator_slice(endpoints: Vec<(&str, Option<bool>, Option<bool>)>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta::default(),
        address_type: "IPv4".into(),
        endpoints: endpoints
            .into_iter()
            .map(|(ip, ready, terminating)| Endpoint {
                addresses: vec![ip.into()],
                conditions: Some(EndpointConditions {
                    ready,
                    serving: None,
                    terminating,
                }),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![
            EndpointPort {
                name: Some("admin".into()),
                port: Some(9090),
                ..EndpointPort::default()
            },
            EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..EndpointPort::default()
            },
        ]),
    }
}

#[test]
fn activator_endpoints_are_the_ready_pods_on_the_http_port() {
    let a = activator_slice(vec![
        ("10.1.0.9", None, None),
        ("10.1.0.7", Some(true), None),
        ("10.1.0.8", Some(false), None),
        ("10.1.0.6", Some(true), Some(true)),
        ("127.0.0.1", Some(true), None),
    ]);
    let b = activator_slice(vec![("10.1.0.7", Some(true), None)]);
    let got = aggregate([&a, &b]);
    assert_eq!(got.port, 8080);
    let ips: Vec<&str> = got.endpoints.iter().map(|e| e.ip.as_str()).collect();
    assert_eq!(ips, vec!["10.1.0.7", "10.1.0.9"]);
    assert_eq!(aggregate([&activator_slice(vec![])]).endpoints.len(), 0);
}

#[test]
fn function_names_that_cannot_name_a_service_are_refused() {
    assert_eq!(build::check_name("hello"), None);
    assert_eq!(build::check_name(&"a".repeat(build::MAX_NAME_LEN)), None);
    for bad in [
        "my.fn",
        "1st",
        "Hello",
        "trailing-",
        &"a".repeat(build::MAX_NAME_LEN + 1),
    ] {
        let problem = build::check_name(bad).unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(problem.starts_with("metadata.name"), "{problem}");
    }
}

#[test]
fn an_ipv6_only_cluster_gets_an_ipv6_slice() {
    let mut v6 = activator_slice(vec![
        ("fd00::7", Some(true), None),
        ("::1", Some(true), None),
    ]);
    v6.address_type = "IPv6".into();
    let got = aggregate([&v6]);
    assert_eq!(got.address_type, "IPv6");
    let ips: Vec<&str> = got.endpoints.iter().map(|e| e.ip.as_str()).collect();
    assert_eq!(
        ips,
        vec!["fd00::7"],
        "loopback is never written into a slice"
    );
    let f = hello();
    let slice = build::build(&f, &config(&f), Replicas::Omit, Some(&got))
        .unwrap()
        .activator_slice
        .unwrap();
    assert_eq!(slice.address_type, "IPv6");

    // Dual-stack: IPv4 wins (a Service's primary family is IPv4 there by default).
    let v4 = activator_slice(vec![("10.1.0.7", Some(true), None)]);
    assert_eq!(aggregate([&v6, &v4]).address_type, "IPv4");
    assert_eq!(aggregate([&v6, &v4]).endpoints.len(), 1);
}

/// The documents of examples/existing-deployment.yaml: the user's Deployment, their
/// Service, and the Function pointing at the Deployment.
fn existing_deployment_example() -> (Deployment, k8s_openapi::api::core::v1::Service, Function) {
    use serde::Deserialize;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/existing-deployment.yaml"
    ))
    .unwrap();
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect();
    let mut deployment: Deployment = serde_json::from_value(docs[0].clone()).unwrap();
    deployment.metadata.uid = Some("d-uid".into());
    deployment.spec.as_mut().unwrap().replicas = Some(1);
    let service = serde_json::from_value(docs[1].clone()).unwrap();
    let mut function: Function = serde_json::from_value(docs[2].clone()).unwrap();
    function.metadata.uid = Some("f-uid".into());
    function.metadata.generation = Some(1);
    (deployment, service, function)
}

#[test]
fn a_target_function_routes_to_the_targets_pods_and_owns_only_its_routing() {
    use zeroscale::operator::build::{PORT_NAME, SERVICE_LABEL};
    use zeroscale::operator::target::{RECORD_ANNOTATION, Record, TargetObject};
    let (deployment, user_service, f) = existing_deployment_example();
    let c = config(&f);
    let target = TargetObject::Deployment(deployment);
    let selector = target.selector().unwrap();
    let record = Record::take(
        &target,
        jiff::Timestamp::from_second(1_700_000_000).unwrap(),
    );
    let routing =
        build::build_target(&f, &c, Some((&selector, &record)), Some(&activators())).unwrap();

    // The private Service selects the target's pods by the target's own selector: the
    // same pods the user's Service selects.
    let private = &routing.private_service;
    assert_eq!(private.metadata.name.as_deref(), Some("web-lazy-private"));
    let spec = private.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(
        spec.selector.as_ref(),
        user_service.spec.as_ref().unwrap().selector.as_ref()
    );
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.name.as_deref(), Some(PORT_NAME));
    assert_eq!(
        (port.port, port.target_port.clone()),
        (8080, Some(IntOrString::Int(8080)))
    );
    // Labelled like a template Function's: the EndpointSlice controller copies these to
    // the slices the activators find the replicas by.
    let l = labels(&private.metadata);
    assert_eq!(l.get(FUNCTION_LABEL).map(String::as_str), Some("web-lazy"));
    assert_eq!(l.get(SERVICE_LABEL).map(String::as_str), Some("private"));
    // It remembers what the target had, to give it back.
    let recorded = private.metadata.annotations.as_ref().unwrap()[RECORD_ANNOTATION].clone();
    let back: Record = serde_json::from_str(&recorded).unwrap();
    assert_eq!(
        (back.kind.as_str(), back.name.as_str()),
        ("Deployment", "web")
    );
    assert_eq!((back.uid.as_str(), back.original_replicas), ("d-uid", 1));

    // Every object is the Function's own (garbage collection), none is the target.
    for meta in [
        &routing.private_service.metadata,
        &routing.public_service.metadata,
        &routing.activator_slice.as_ref().unwrap().metadata,
    ] {
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str()),
            ("Function", "f-uid")
        );
    }
    let public = routing.public_service.spec.as_ref().unwrap();
    assert!(public.selector.is_none(), "clients reach the activators");
    assert_eq!(
        routing.activator_slice.as_ref().unwrap().endpoints.len(),
        2,
        "the slice points at the activators"
    );

    // Not holding the target (missing, refused, another Function has it): the private
    // Service selects the Function's own label, which no pod has, and records nothing,
    // so no replica is routed to.
    let idle = build::build_target(&f, &c, None, Some(&activators())).unwrap();
    assert_eq!(
        idle.private_service.spec.as_ref().unwrap().selector,
        Some(BTreeMap::from([(
            FUNCTION_LABEL.to_string(),
            "web-lazy".to_string()
        )]))
    );
    assert!(
        !idle
            .private_service
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key(RECORD_ANNOTATION)
    );
    assert!(
        !up_to_date(&idle.private_service, Some(&routing.private_service)),
        "taking or giving back the target is a change to apply"
    );
    assert_eq!(idle.public_service, routing.public_service);
}

/// Changes a Function's pod template as JSON.
fn edit_template(f: &mut zeroscale::api::Function, edit: impl FnOnce(&mut serde_json::Value)) {
    let template = f.spec.template.as_mut().unwrap();
    let mut value = template.value();
    edit(&mut value);
    *template = zeroscale::api::PodTemplate::from_value(value);
}

/// Thousands of Functions in a namespace are twice as many Services; their Docker-link
/// variables in every container would exceed what a process may be started with.
#[test]
fn service_links_are_off_unless_the_template_asks_for_them() {
    let f = hello();
    let d = build::build(&f, &config(&f), Replicas::Create(0), None).unwrap();
    let spec = d.deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.enable_service_links, Some(false));

    let mut value = serde_json::to_value(hello()).unwrap();
    value["spec"]["template"]["spec"]["enableServiceLinks"] = serde_json::json!(true);
    let wants: Function = serde_json::from_value(value).unwrap();
    let d = build::build(&wants, &config(&wants), Replicas::Create(0), None).unwrap();
    let spec = d.deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        spec.enable_service_links,
        Some(true),
        "the user's choice is kept"
    );
}
