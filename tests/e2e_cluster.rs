//! The real-cluster suite (`make e2e`): the path a user takes, on the cluster in
//! KUBECONFIG, judged by the API server rather than by our mocks.
//!
//! - the CRD installs with plain `kubectl apply` and with `--server-side`, and the
//!   admission rules refuse invalid Functions with messages naming the field;
//! - `kubectl apply --server-side -k config/default` installs zeroscale and a Function
//!   is answered from zero;
//! - the Helm chart, rendered and applied, runs both components on their own
//!   ServiceAccounts (the RBAC is exercised, least privilege checked); a Function
//!   becomes its objects and a truthful status, drift is repaired, a request to it at
//!   zero wakes it (`X-Zeroscale-Cold-Start: true`), load scales it up and idleness
//!   takes it back to zero, a Function that cannot start fails fast with the kubelet's
//!   reason, a standby operator takes over from a dead leader, and deleting the Function
//!   garbage-collects everything.
//!
//! Every test cleans up what it made (its namespaces, its install), also when it fails,
//! and sweeps what a crashed run left. Without a reachable cluster each test is skipped;
//! with `ZEROSCALE_E2E_REQUIRE=1` it fails instead. Where the cluster has no kubelet (a
//! bare control plane) the stand-in node (`tests/standin/`) runs the pods; see
//! `tests/e2e_support` for the knobs. Run one test at a time (`--test-threads=1`): the
//! installs watch every namespace, so two at once would fight over the same Functions.

mod e2e_support;

use std::collections::BTreeMap;
use std::time::Duration;

use e2e_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use zeroscale::api::{
    COLD_START_HEADER, CONDITION_ACTIVE, CONDITION_READY, FUNCTION_LABEL, Function,
};
use zeroscale::operator::build::SLICE_MANAGER;

const CRD_NAME: &str = "functions.zeroscale.dev";

/// Applies crds/function.yaml with `args` and waits until the CRD is established.
async fn install_crd(cluster: &Cluster, args: &[&str]) {
    let mut all = vec!["apply"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-f", "crds/function.yaml"]);
    kubectl(&all, None).unwrap_or_else(|e| panic!("the CRD installs: {e}"));
    let api: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    eventually("the CRD to be established", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let crd = api.get(CRD_NAME).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await;
}

/// Whether the API server kept the CRD's CEL rules (1.25+, or 1.24 with its feature gate).
async fn cel_enforced(cluster: &Cluster) -> bool {
    let api: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    let crd = api.get(CRD_NAME).await.expect("the CRD");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("json");
    schema["openAPIV3Schema"]["x-kubernetes-validations"].is_array()
}

/// `kubectl apply --dry-run=server` of a manifest: the API server's verdict, once
/// kubectl's discovery knows the kind.
async fn dry_run(manifest: &serde_json::Value) -> Result<String, String> {
    let text = serde_json::to_string(manifest).expect("json");
    eventually(
        "kubectl to know Functions",
        Duration::from_secs(60),
        || async {
            match kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&text)) {
                Err(e)
                    if e.contains("no matches for kind")
                        || e.contains("couldn't find resource") =>
                {
                    None
                }
                other => Some(other),
            }
        },
    )
    .await
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn the_crd_installs_both_ways_and_admission_refuses_invalid_functions() {
    let test = "the_crd_installs_both_ways_and_admission_refuses_invalid_functions";
    let Some(cluster) = cluster(test).await else {
        return;
    };
    remove_leftovers(&cluster).await;

    // A first install, on the create path, of exactly this CRD under another group: every
    // field is decoded strictly by this API server (the real one may exist already).
    let text = std::fs::read_to_string(root().join("crds/function.yaml")).expect("the CRD");
    let group = format!("e2e{:06x}.zeroscale.dev", rand::random::<u32>() & 0xff_ffff);
    let copy = text
        .replace(
            "name: functions.zeroscale.dev",
            &format!("name: functions.{group}"),
        )
        .replace("group: zeroscale.dev", &format!("group: {group}"));
    let created = kubectl(&["create", "-f", "-"], Some(&copy));
    let _ = kubectl(
        &[
            "delete",
            "crd",
            &format!("functions.{group}"),
            "--ignore-not-found",
        ],
        None,
    );
    created.unwrap_or_else(|e| panic!("the CRD is refused on create: {e}"));

    // The real one, as the README says: plain client-side apply, then server-side.
    install_crd(&cluster, &[]).await;
    install_crd(&cluster, &["--server-side", "--force-conflicts"]).await;
    // The API server publishes a new CRD's schema to kubectl's discovery a moment later.
    let explained = eventually("kubectl explain", Duration::from_secs(60), || async {
        kubectl(&["explain", "function.spec.scale.idleTimeout"], None).ok()
    })
    .await;
    assert!(explained.contains("idle"), "{explained}");

    let ns = TestNamespace::new(&cluster, "zeroscale-e2e-admission").await;
    let cel = cel_enforced(&cluster).await;
    eprintln!("CEL rules enforced by this API server: {cel}");
    // (spec fragment, whether the rule is CEL, what the message must say)
    let cases: &[(serde_json::Value, bool, &str)] = &[
        (json!({"port": 70000}), false, "spec.port"),
        (json!({"port": 0}), false, "spec.port"),
        (json!({"scale": {"min": -1}}), false, "spec.scale.min"),
        (json!({"scale": {"max": 0}}), false, "spec.scale.max"),
        (json!({"scale": {"target": 0}}), false, "spec.scale.target"),
        (
            json!({"scale": {"utilization": 101}}),
            false,
            "spec.scale.utilization",
        ),
        (
            json!({"scale": {"window": "soon"}}),
            false,
            "spec.scale.window",
        ),
        (
            json!({"scale": {"panicThresholdPercent": 100}}),
            false,
            "spec.scale.panicThresholdPercent",
        ),
        (
            json!({"queue": {"capacity": 0}}),
            false,
            "spec.queue.capacity",
        ),
        (json!({"hosts": ["Not_A_Host"]}), false, "spec.hosts[0]"),
        (
            json!({"template": {"spec": {"containers": []}}}),
            false,
            "spec.template.spec.containers",
        ),
        (
            json!({"scale": {"min": 3, "max": 2}}),
            true,
            "scale.min must not exceed scale.max",
        ),
        (
            json!({"scale": {"initial": 3, "max": 2}}),
            true,
            "scale.initial must not exceed scale.max",
        ),
        (
            json!({"scale": {"min": 2, "initial": 1}}),
            true,
            "scale.initial must be at least scale.min",
        ),
        (
            json!({"hosts": ["db.prod.svc.cluster.local"]}),
            true,
            "hosts may not list cluster service names",
        ),
        // What runs: exactly one of template and scaleTargetRef (null: left out).
        (
            json!({"template": null, "port": 8080}),
            true,
            "spec.template is required unless spec.scaleTargetRef is set",
        ),
        (
            json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "port": 8080}),
            true,
            "spec.scaleTargetRef must not be set together with spec.template",
        ),
        (
            json!({"template": null, "scaleTargetRef": {"kind": "Deployment", "name": "web"}}),
            true,
            "spec.port is required with spec.scaleTargetRef",
        ),
        (
            json!({"template": null, "port": 8080,
                   "scaleTargetRef": {"kind": "DaemonSet", "name": "web"}}),
            false,
            "spec.scaleTargetRef.kind",
        ),
        (
            json!({"template": null, "port": 8080,
                   "scaleTargetRef": {"kind": "Deployment", "name": "Web_App"}}),
            false,
            "spec.scaleTargetRef.name",
        ),
    ];
    let mut refused = 0;
    for (n, (spec, is_cel, message)) in cases.iter().enumerate() {
        let mut f = test_function(&ns.name, &format!("bad-{n}"), json!({}));
        for (k, v) in spec.as_object().expect("an object") {
            if v.is_null() {
                f["spec"].as_object_mut().expect("a spec").remove(k);
            } else {
                f["spec"][k] = v.clone();
            }
        }
        // The runtime validation refuses the same (API servers without CEL rely on it).
        if let Ok(parsed) = serde_json::from_value::<Function>(f.clone())
            && (spec.to_string().contains("scaleTargetRef") || spec.get("template").is_some())
        {
            assert!(
                zeroscale::api::config::validate(&parsed.spec).is_err(),
                "the operator refuses {spec} too"
            );
        }
        let result = dry_run(&f).await;
        if *is_cel && !cel {
            assert!(result.is_ok(), "without CEL the API server accepts {spec}");
            continue;
        }
        let err = result.expect_err(&format!("{spec} must be refused at admission"));
        assert!(err.contains(message), "{spec}: {err}");
        refused += 1;
    }
    // A name the Function's Services can't carry (DNS-1035, 53 characters at most).
    let mut f = test_function(&ns.name, "fn.with.dots", json!({}));
    f["metadata"]["name"] = json!("fn.with.dots");
    let result = dry_run(&f).await;
    if cel {
        let err = result.expect_err("a dotted name is refused");
        assert!(err.contains("DNS-1035"), "{err}");
        refused += 1;
    }
    eprintln!("{refused} invalid Functions refused at admission");
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn kustomize_installs_zeroscale_and_a_function_answers_from_zero() {
    let test = "kustomize_installs_zeroscale_and_a_function_answers_from_zero";
    let Some(cluster) = cluster(test).await else {
        return;
    };
    remove_leftovers(&cluster).await;
    wait_namespace_gone(&cluster, "zeroscale-system").await;
    let install = Install::kustomize(&cluster).await;
    install.wait_ready(&cluster).await;
    let ns = TestNamespace::new(&cluster, "zeroscale-e2e-kustomize").await;

    // examples/hello.yaml, as the README has a user apply it.
    let text = std::fs::read_to_string(root().join("examples/hello.yaml")).expect("hello.yaml");
    let manifest = text.replace("namespace: default", &format!("namespace: {}", ns.name));
    kubectl(&["apply", "-f", "-"], Some(&manifest)).expect("examples/hello.yaml applies");
    wait_ready_condition(&cluster, &ns.name, "hello").await;
    let gw = gateway(&cluster, &install, &ns.name, "hello").await;
    assert_woken(&first_answer(&gw, "/").await, "hello");
    let listed = kubectl(&["get", "functions", "-n", &ns.name], None).expect("kubectl get");
    for column in ["URL", "READY", "REPLICAS", "DESIRED", "AGE"] {
        assert!(listed.contains(column), "{listed}");
    }
    drop(gw);
    // Deleted; the namespace controller finishes in its own time (the next run of this
    // test waits for it).
    drop(ns);
    drop(install);
}

/// Waits for `Ready=True` on a Function's status and returns the Function.
async fn wait_ready_condition(cluster: &Cluster, namespace: &str, name: &str) -> Function {
    let functions: Api<Function> = Api::namespaced(cluster.client.clone(), namespace);
    eventually(
        &format!("{namespace}/{name} to be Ready"),
        Duration::from_secs(60),
        || {
            let functions = functions.clone();
            async move {
                let f = functions.get(name).await.ok()?;
                let ready = f.condition(CONDITION_READY)?;
                (ready.status == "True"
                    && f.status.as_ref()?.observed_generation == f.metadata.generation)
                    .then_some(f)
            }
        },
    )
    .await
}

/// The first answer through a gateway that was just set up (its proxy may need a moment
/// to follow a new Service; a connection refused then is not the Function's answer).
async fn first_answer(gw: &Gateway, path: &str) -> Reply {
    eventually("a first answer", Duration::from_secs(60), || async {
        get(gw.addr, &gw.host, path).await.ok()
    })
    .await
}

/// A 200 that woke its Function from zero (the activator says so in a header).
fn assert_woken(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {reply:?}");
    assert_eq!(
        reply.headers.get(COLD_START_HEADER).map(|v| v.as_bytes()),
        Some(&b"true"[..]),
        "{what}: the first request woke it from zero"
    );
}

/// Six clients load Function `function` until its `deployment` has three ready
/// replicas; every request must be answered 200. Returns the peak and the requests sent.
async fn scale_under_load(
    cluster: &Cluster,
    install: &Install,
    namespace: &str,
    function: &str,
    deployment: &str,
) -> (i32, u64) {
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), namespace);
    let stop = CancellationToken::new();
    let load_run = {
        let stop = stop.clone();
        let gw = gateway(cluster, install, namespace, function).await;
        tokio::spawn(async move { load(&gw, "/?delay=0.3", 6, stop).await })
    };
    let peak = eventually(
        &format!("load to scale {deployment} to 3 or more"),
        Duration::from_secs(60),
        || async {
            let (_, ready) = replicas(&deployments, deployment).await;
            (ready >= 3).then_some(ready)
        },
    )
    .await;
    stop.cancel();
    let report = load_run.await.expect("the load run");
    assert!(report.lossless(), "every request answered 200: {report:?}");
    (peak, report.sent)
}

/// What most tests start from: the CRD, a namespace for the test's Functions and a chart
/// install of this run's own (release and install namespace) that serves only that
/// namespace, ready. `values` are merged over `watchNamespaces`. `None` without a cluster.
async fn namespaced_chart(
    test: &str,
    prefix: &str,
    values: serde_json::Value,
) -> Option<(Cluster, TestNamespace, Install)> {
    let cluster = cluster(test).await?;
    remove_leftovers(&cluster).await;
    install_crd(&cluster, &["--server-side", "--force-conflicts"]).await;
    // A namespace-scoped install (watchNamespaces): its own Roles, and no other install on
    // the cluster (a run of the kustomize test, someone's cluster-wide zeroscale) sees
    // the Functions it serves.
    let ns = TestNamespace::new(&cluster, prefix).await;
    let (release, system) = release_names();
    let mut all = json!({"watchNamespaces": [ns.name]});
    if let (Some(all), Some(extra)) = (all.as_object_mut(), values.as_object()) {
        all.extend(extra.clone());
    }
    let install = Install::chart(&cluster, &release, &system, all).await;
    install.wait_ready(&cluster).await;
    Some((cluster, ns, install))
}

/// A release name and install namespace of this run's own.
fn release_names() -> (String, String) {
    let id = rand::random::<u16>();
    // Containing the chart's name, the release name is the prefix of every object.
    (
        format!("zeroscale-e2e-{id:04x}"),
        format!("zeroscale-e2e-system-{id:04x}"),
    )
}

/// Replica counts the suite watches.
async fn replicas(deployments: &Api<Deployment>, name: &str) -> (i32, i32) {
    let d = deployments.get(name).await.expect("the Deployment");
    (
        d.spec.and_then(|s| s.replicas).unwrap_or(0),
        d.status.and_then(|s| s.ready_replicas).unwrap_or(0),
    )
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn the_chart_installs_and_serves_scales_fails_fast_and_cleans_up() {
    let test = "the_chart_installs_and_serves_scales_fails_fast_and_cleans_up";
    let Some((cluster, ns, install)) =
        namespaced_chart(test, "zeroscale-e2e-chart", json!({})).await
    else {
        return;
    };
    let system = install.namespace.clone();
    eprintln!("ok: the chart installed; operator and activator available");

    // Least privilege, as the API server sees the components' own ServiceAccounts.
    let can = |sa: &str, verb: &str, what: &str| -> bool {
        let (resource, subresource) = match what.split_once('/') {
            Some((r, sub)) => (r, format!("--subresource={sub}")),
            None => (what, String::from("--subresource=")),
        };
        kubectl(
            &[
                "auth",
                "can-i",
                verb,
                resource,
                &subresource,
                "-n",
                &ns.name,
                &format!("--as=system:serviceaccount:{system}:{sa}"),
            ],
            None,
        )
        .is_ok_and(|out| out.trim() == "yes")
    };
    let (operator_sa, activator_sa) = (install.operator.as_str(), install.activator.as_str());
    assert!(can(operator_sa, "create", "deployments.apps"));
    assert!(can(operator_sa, "patch", "endpointslices.discovery.k8s.io"));
    assert!(!can(operator_sa, "delete", "deployments.apps"));
    assert!(!can(operator_sa, "get", "secrets"));
    assert!(can(activator_sa, "update", "deployments.apps/scale"));
    assert!(!can(activator_sa, "patch", "deployments.apps"));
    assert!(!can(activator_sa, "create", "pods"));
    let operators = install.pods(&cluster, "operator").await;
    assert!(
        operators.iter().all(|p| p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            == Some(operator_sa)),
        "the operator runs on its own ServiceAccount"
    );

    // A Function becomes its objects and a truthful status.
    let scale = json!({"scale": {
        "min": 0, "max": 4, "target": 1, "utilization": 100,
        "window": "6s", "idleTimeout": "4s"
    }});
    apply(&test_function(&ns.name, "echo", scale.clone())).expect("the Function applies");
    let f = wait_ready_condition(&cluster, &ns.name, "echo").await;
    let status = f.status.clone().expect("a status");
    assert_eq!(
        status.url.as_deref(),
        Some(format!("http://echo.{}.svc.cluster.local", ns.name).as_str())
    );
    assert_eq!(
        f.condition(CONDITION_ACTIVE).map(|c| c.reason.as_str()),
        Some("ScaledToZero")
    );
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns.name);
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), &ns.name);
    let d = deployments.get("echo").await.expect("the Deployment");
    assert_eq!(
        d.spec.as_ref().and_then(|s| s.replicas),
        Some(0),
        "idle at min"
    );
    assert_eq!(
        d.spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone()),
        Some(BTreeMap::from([(FUNCTION_LABEL.into(), "echo".into())]))
    );
    let owner = &d.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Function", Some(true))
    );
    assert!(services.get("echo-private").await.is_ok());
    let public = services.get("echo").await.expect("the public Service");
    assert!(
        public
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .is_none()
    );
    let activator_ips: Vec<String> = install
        .pods(&cluster, "activator")
        .await
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    let slice = eventually(
        "the activator slice to list every activator",
        Duration::from_secs(60),
        || async {
            let s = slices.get_opt("echo-activator").await.ok().flatten()?;
            let mut ips: Vec<String> = s
                .endpoints
                .iter()
                .flat_map(|e| e.addresses.clone())
                .collect();
            ips.sort();
            let mut want = activator_ips.clone();
            want.sort();
            (ips == want).then_some(s)
        },
    )
    .await;
    assert_eq!(
        slice
            .labels()
            .get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str),
        Some(SLICE_MANAGER)
    );
    eprintln!("ok: objects and status");

    // Drift: a deleted Service comes back, an edited Deployment is put back.
    services
        .delete("echo", &DeleteParams::default())
        .await
        .expect("delete the Service");
    eventually(
        "the Service to be recreated",
        Duration::from_secs(60),
        || async {
            let s = services.get_opt("echo").await.ok().flatten()?;
            s.metadata.deletion_timestamp.is_none().then_some(())
        },
    )
    .await;
    let grace = |d: Deployment| d.spec?.template.spec?.termination_grace_period_seconds;
    let built = grace(deployments.get("echo").await.expect("the Deployment"));
    // 10 s of the template plus the 300 s of timeouts.request a drain may wait for.
    assert_eq!(built, Some(310));
    deployments
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 99}}}}),
            ),
        )
        .await
        .expect("an edit by someone else");
    eventually(
        "the Deployment to be put back",
        Duration::from_secs(60),
        || async { (grace(deployments.get("echo").await.ok()?) == built).then_some(()) },
    )
    .await;
    eprintln!("ok: drift repaired");

    // From zero: the first request wakes it, through the Function's Service.
    let gw = gateway(&cluster, &install, &ns.name, "echo").await;
    assert_woken(&first_answer(&gw, "/").await, "echo");
    // Warm for every activator once each routes the pod the slice lists (until then, one
    // that has not served it yet holds a request for the pod: a cold start to it).
    eventually(
        "every activator to route the pod",
        Duration::from_secs(60),
        || async {
            every_activator_routes(&cluster, &install, &ns.name, "echo")
                .await
                .then_some(())
        },
    )
    .await;
    let warm = get(gw.addr, &gw.host, "/").await.expect("a warm answer");
    assert_eq!(warm.status, 200);
    assert!(warm.headers.get(COLD_START_HEADER).is_none());
    eprintln!("ok: woken from zero");

    // Load scales it up; every request is answered.
    let (peak, sent) = scale_under_load(&cluster, &install, &ns.name, "echo", "echo").await;
    eprintln!("ok: scaled to {peak} ready replicas under load, {sent} requests, all 200");

    // Idle: back to zero, and the status says so.
    eventually(
        "idleness to take it to zero",
        Duration::from_secs(90),
        || async {
            let (spec, _) = replicas(&deployments, "echo").await;
            (spec == 0).then_some(())
        },
    )
    .await;
    let functions: Api<Function> = Api::namespaced(cluster.client.clone(), &ns.name);
    eventually(
        "Active=False ScaledToZero",
        Duration::from_secs(60),
        || async {
            let f = functions.get("echo").await.ok()?;
            (f.condition(CONDITION_ACTIVE)?.reason == "ScaledToZero").then_some(())
        },
    )
    .await;
    // The autoscaler's decisions are Events on the Function (`kubectl describe`), one
    // for each different decision.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client.clone(), &ns.name);
    let scaled = eventually("Scaled Events", Duration::from_secs(30), || async {
        let list = events.list(&Default::default()).await.ok()?;
        let notes: Vec<String> = list
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some("Scaled")
                    && e.reporting_controller.as_deref() == Some("zeroscale-autoscaler")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("echo")
            })
            .filter_map(|e| e.note)
            .collect();
        notes
            .iter()
            .any(|n| n.starts_with("scaled to 0"))
            .then_some(notes)
    })
    .await;
    eprintln!("ok: back to zero when idle; Scaled Events: {scaled:?}");

    // A Function that can't start: requests fail fast with the kubelet's reason.
    for (name, container, reason) in [
        (
            "nopull",
            json!({"image": "registry.invalid/zeroscale/nothing:1"}),
            "ImagePull",
        ),
        (
            "crashes",
            json!({"command": ["python3", "-c", "import sys; sys.exit(3)"]}),
            "CrashLoop",
        ),
    ] {
        let mut f = test_function(&ns.name, name, json!({"timeouts": {"activation": "90s"}}));
        for (k, v) in container.as_object().expect("an object") {
            f["spec"]["template"]["spec"]["containers"][0][k] = v.clone();
        }
        apply(&f).expect("the Function applies");
        wait_ready_condition(&cluster, &ns.name, name).await;
        let gw = gateway(&cluster, &install, &ns.name, name).await;
        let started = tokio::time::Instant::now();
        let reply = first_answer(&gw, "/").await;
        assert_eq!(reply.status, 503, "{name}: {reply:?}");
        assert!(reply.body.contains(reason), "{name}: {}", reply.body);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{name}: answered before the activation timeout"
        );
        eprintln!("ok: {name} fails fast: {}", reply.body.trim());
    }

    // A spec only the operator can refuse (a window under 6s) is reported on the status.
    let bad = test_function(&ns.name, "shortwindow", json!({"scale": {"window": "2s"}}));
    apply(&bad).expect("admission accepts what only the operator checks");
    eventually(
        "Ready=False InvalidSpec",
        Duration::from_secs(60),
        || async {
            let f = functions.get("shortwindow").await.ok()?;
            let ready = f.condition(CONDITION_READY)?.clone();
            (ready.reason == "InvalidSpec" && ready.message.contains("spec.scale.window"))
                .then_some(())
        },
    )
    .await;
    eprintln!("ok: runtime validation on the status");

    // The leader dies: the standby takes the Lease and does the work.
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &system);
    let leader = eventually("a leader", Duration::from_secs(60), || async {
        leases
            .get_opt(&install.operator)
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    })
    .await;
    kill_pod(&cluster, &system, &leader).await;
    let successor = eventually(
        "another operator to lead",
        Duration::from_secs(60),
        || async {
            let holder = leases
                .get_opt(&install.operator)
                .await
                .ok()
                .flatten()?
                .spec?
                .holder_identity?;
            (holder != leader).then_some(holder)
        },
    )
    .await;
    apply(&test_function(&ns.name, "after", json!({}))).expect("applies");
    wait_ready_condition(&cluster, &ns.name, "after").await;
    eprintln!("ok: {successor} took over from {leader}");

    // Deleting a Function garbage-collects everything it owned.
    functions
        .delete("echo", &DeleteParams::default())
        .await
        .expect("delete the Function");
    eventually("garbage collection", Duration::from_secs(60), || async {
        let gone = deployments.get_opt("echo").await.ok()?.is_none()
            && services.get_opt("echo").await.ok()?.is_none()
            && services.get_opt("echo-private").await.ok()?.is_none()
            && slices.get_opt("echo-activator").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    eprintln!("ok: garbage collected");
    drop(ns);
    drop(install);
}

/// Ready replicas of a Function, and every replica count its Deployment passed through
/// (for counting scale changes).
async fn wait_ready_replicas(deployments: &Api<Deployment>, name: &str, want: i32) {
    eventually(
        &format!("{name} to have exactly {want} ready replicas"),
        Duration::from_secs(120),
        || async {
            let (spec, ready) = replicas(deployments, name).await;
            (spec == want && ready == want).then_some(())
        },
    )
    .await;
}

fn assert_lossless(scenario: &str, report: &LoadReport) {
    eprintln!(
        "{scenario}: {} requests, {:?} by status, {} without an answer",
        report.sent, report.statuses, report.failed
    );
    assert!(
        report.lossless() && report.sent > 0,
        "{scenario}: every request must be answered 200: {report:?}"
    );
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn no_request_is_lost_under_churn() {
    let test = "no_request_is_lost_under_churn";
    let Some((cluster, ns, install)) =
        namespaced_chart(test, "zeroscale-e2e-churn", json!({})).await
    else {
        return;
    };
    let system = install.namespace.clone();
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    let fixed = |n: i32| json!({"scale": {"min": n, "max": n, "initial": n, "window": "6s"}});

    // 1. Scale 4 -> 1 under a steady client: the three stopping replicas drain first.
    apply(&test_function(&ns.name, "steady", fixed(4))).expect("applies");
    wait_ready_condition(&cluster, &ns.name, "steady").await;
    let gw = gateway(&cluster, &install, &ns.name, "steady").await;
    first_answer(&gw, "/").await;
    wait_ready_replicas(&deployments, "steady", 4).await;
    let ((), report) = under_load(&gw, "/?delay=0.2", 4, || async {
        apply(&test_function(&ns.name, "steady", fixed(1))).expect("applies");
        wait_ready_replicas(&deployments, "steady", 1).await;
        // The stopped pods are gone, not only unready.
        eventually(
            "the stopped pods to be gone",
            Duration::from_secs(120),
            || async {
                let pods: Api<k8s_openapi::api::core::v1::Pod> =
                    Api::namespaced(cluster.client.clone(), &ns.name);
                let n = pods
                    .list(
                        &kube::api::ListParams::default()
                            .labels(&format!("{FUNCTION_LABEL}=steady")),
                    )
                    .await
                    .ok()?
                    .items
                    .len();
                (n == 1).then_some(())
            },
        )
        .await;
    })
    .await;
    assert_lossless("scale 4 -> 1 under load", &report);

    // 2. A template rollout under load: every pod is replaced.
    let mut rolled = test_function(&ns.name, "steady", fixed(2));
    let ((), report) = under_load(&gw, "/?delay=0.2", 4, || async {
        apply(&rolled).expect("applies");
        wait_ready_replicas(&deployments, "steady", 2).await;
        rolled["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array_mut()
            .expect("env")
            .push(json!({"name": "GENERATION", "value": "2"}));
        apply(&rolled).expect("applies");
        eventually(
            "the rollout to finish",
            Duration::from_secs(120),
            || async {
                let d = deployments.get("steady").await.ok()?;
                let s = d.status?;
                (s.updated_replicas == Some(2)
                    && s.replicas == Some(2)
                    && s.ready_replicas == Some(2)
                    && d.metadata.generation == s.observed_generation)
                    .then_some(())
            },
        )
        .await;
    })
    .await;
    assert_lossless("template rollout under load", &report);

    // 3. An activator stopped (SIGTERM) with slow requests in flight, another running.
    let victim = install.pods(&cluster, "activator").await[0].name_any();
    let ((), report) = under_load(&gw, "/?delay=2", 8, || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(cluster.client.clone(), &system);
        pods.delete(&victim, &DeleteParams::default())
            .await
            .expect("delete an activator pod");
        install.wait_ready(&cluster).await;
        eventually(
            "the stopped activator to be gone",
            Duration::from_secs(400),
            || async { pods.get_opt(&victim).await.ok()?.is_none().then_some(()) },
        )
        .await;
    })
    .await;
    assert_lossless("an activator stopped under slow load", &report);

    // 4. The operator down during a wake: the activator wakes the Function itself.
    apply(&test_function(
        &ns.name,
        "lonely",
        json!({"scale": {"idleTimeout": "4s", "window": "6s"}}),
    ))
    .expect("applies");
    wait_ready_condition(&cluster, &ns.name, "lonely").await;
    let operators: Api<Deployment> = Api::namespaced(cluster.client.clone(), &system);
    operators
        .patch_scale(
            &install.operator,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .expect("stop the operator");
    eventually("no operator pod", Duration::from_secs(120), || async {
        install
            .pods(&cluster, "operator")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let lonely = gateway(&cluster, &install, &ns.name, "lonely").await;
    assert_woken(
        &first_answer(&lonely, "/").await,
        "woken without an operator",
    );
    operators
        .patch_scale(
            &install.operator,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("restart the operator");
    install.wait_ready(&cluster).await;
    eprintln!("ok: woken while the operator was down");

    // 5. The API server frozen under warm load (a local control plane names its pid).
    if let Ok(pid) = std::env::var("ZEROSCALE_E2E_APISERVER_PID") {
        let pid: i32 = pid.parse().expect("a pid");
        let signal = |s: nix::sys::signal::Signal| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s)
                .expect("signal the API server")
        };
        let ((), report) = under_load(&gw, "/?delay=0.1", 4, || async {
            signal(nix::sys::signal::Signal::SIGSTOP);
            tokio::time::sleep(Duration::from_secs(20)).await;
            signal(nix::sys::signal::Signal::SIGCONT);
        })
        .await;
        assert_lossless("the API server frozen for 20 s", &report);
        // Afterwards the watches resume and a cold wake works again.
        eventually(
            "the cold Function to be back at zero",
            Duration::from_secs(120),
            || async {
                let (spec, _) = replicas(&deployments, "lonely").await;
                (spec == 0).then_some(())
            },
        )
        .await;
        let cold = first_answer(&lonely, "/").await;
        assert_eq!(cold.status, 200, "a wake after the freeze: {cold:?}");
        eprintln!("ok: a wake after the API server came back");
    } else {
        eprintln!("skipped the API server freeze: set ZEROSCALE_E2E_APISERVER_PID");
    }

    // 6. From zero, four keep-alive clients at target 1: every request answered, at the
    //    rate the replicas allow (the stall of the first landing).
    let repeats: usize = std::env::var("ZEROSCALE_E2E_STALL_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for round in 0..repeats {
        let name = format!("burst{round}");
        apply(&test_function(
            &ns.name,
            &name,
            json!({"scale": {"max": 4, "target": 1, "utilization": 100, "window": "6s"}}),
        ))
        .expect("applies");
        wait_ready_condition(&cluster, &ns.name, &name).await;
        let gw = gateway(&cluster, &install, &ns.name, &name).await;
        // Load from zero until the Function has served for 12 s: how long the platform
        // takes to start the first pod is its own business (a busy cluster takes longer).
        let ((), report) = under_load(&gw, "/?delay=0.2", 4, || async {
            eventually(
                "the first replica to be ready",
                Duration::from_secs(120),
                || async {
                    let (_, ready) = replicas(&deployments, &name).await;
                    (ready > 0).then_some(())
                },
            )
            .await;
            tokio::time::sleep(Duration::from_secs(12)).await;
        })
        .await;
        assert_lossless(
            &format!("from zero, 4 clients at target 1 (round {round})"),
            &report,
        );
        // 4 clients x 5 requests/s once serving; the ramp to 4 replicas costs some of it.
        let rate = report.serving_rate().unwrap_or(0.0);
        eprintln!(
            "round {round}: {} answered, {rate:.1}/s once serving",
            report.ok()
        );
        assert!(rate > 10.0, "round {round}: only {rate:.1} requests/s");
    }

    drop(ns);
    drop(install);
}

/// The user's own Deployment `web` and Service `web` (as a chart or their manifests make
/// them: no `replicas`), running the suite's test app, and examples/existing-deployment.yaml's
/// Function `web-lazy` pointing at the Deployment with the suite's fast scale settings.
fn existing_deployment(
    namespace: &str,
) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let pod = test_function(namespace, "unused", json!({}))["spec"]["template"]["spec"].clone();
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod}},
    });
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    });
    let text = std::fs::read_to_string(root().join("examples/existing-deployment.yaml"))
        .expect("examples/existing-deployment.yaml");
    let function_doc = text
        .split("\n---")
        .find(|d| d.contains("kind: Function"))
        .expect("the example's Function");
    let mut function: serde_json::Value =
        serde_yaml::from_str(function_doc).expect("the example's Function parses");
    function["metadata"]["namespace"] = json!(namespace);
    function["spec"]["scale"] = json!({
        "min": 0, "max": 4, "target": 1, "utilization": 100,
        "window": "6s", "idleTimeout": "4s"
    });
    (deployment, service, function)
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn an_existing_deployment_idles_at_zero_wakes_scales_and_is_given_back() {
    use k8s_openapi::api::events::v1::Event;
    let test = "an_existing_deployment_idles_at_zero_wakes_scales_and_is_given_back";
    let Some((cluster, ns, install)) =
        namespaced_chart(test, "zeroscale-e2e-target", json!({})).await
    else {
        return;
    };
    let system = install.namespace.clone();
    // What a target needs, and no more: the target's spec is never written.
    let can = |sa: &str, verb: &str, resource: &str, subresource: &str| -> bool {
        kubectl(
            &[
                "auth",
                "can-i",
                verb,
                resource,
                &format!("--subresource={subresource}"),
                "-n",
                &ns.name,
                &format!("--as=system:serviceaccount:{system}:{sa}"),
            ],
            None,
        )
        .is_ok_and(|out| out.trim() == "yes")
    };
    let (operator_sa, activator_sa) = (install.operator.as_str(), install.activator.as_str());
    assert!(can(operator_sa, "patch", "functions.zeroscale.dev", ""));
    assert!(can(operator_sa, "watch", "statefulsets.apps", ""));
    assert!(can(operator_sa, "update", "statefulsets.apps", "scale"));
    assert!(!can(operator_sa, "update", "statefulsets.apps", ""));
    assert!(!can(operator_sa, "patch", "statefulsets.apps", ""));
    assert!(can(activator_sa, "update", "statefulsets.apps", "scale"));
    assert!(!can(activator_sa, "patch", "functions.zeroscale.dev", ""));

    // An ordinary Deployment and Service; the Service answers while it has replicas.
    let (deployment, service, function) = existing_deployment(&ns.name);
    apply(&deployment).expect("the Deployment applies");
    let own = services_of(&cluster, &ns.name);
    apply(&service).expect("the Service applies");
    let user_service = own.get("web").await.expect("the user's Service");
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns.name);
    wait_ready_replicas(&deployments, "web", 1).await;
    let own_gw = service_gateway(&cluster, &ns.name, "web").await;
    assert_eq!(first_answer(&own_gw, "/").await.status, 200);
    eprintln!("ok: the Deployment's own Service answers");

    // The Function takes the Deployment: its routing objects, a status, a finalizer;
    // the Deployment stays the user's.
    apply(&function).expect("the Function applies");
    let f = wait_ready_condition(&cluster, &ns.name, "web-lazy").await;
    assert_eq!(
        f.status.as_ref().and_then(|s| s.selector.as_deref()),
        Some("app=web")
    );
    assert_eq!(
        f.metadata.finalizers.as_deref(),
        Some(&["zeroscale.dev/scale-back".to_string()][..])
    );
    let private = own
        .get("web-lazy-private")
        .await
        .expect("the private Service");
    assert_eq!(
        private.spec.as_ref().and_then(|s| s.selector.clone()),
        Some(BTreeMap::from([("app".to_string(), "web".to_string())]))
    );
    let d = deployments.get("web").await.expect("the Deployment");
    assert!(d.owner_references().is_empty() && !d.labels().contains_key(FUNCTION_LABEL));
    eprintln!("ok: the Function holds the Deployment");

    // Idle: to zero after its idle timeout.
    eventually(
        "idleness to take the Deployment to zero",
        Duration::from_secs(90),
        || async { (replicas(&deployments, "web").await.0 == 0).then_some(()) },
    )
    .await;
    let functions: Api<Function> = Api::namespaced(cluster.client.clone(), &ns.name);
    eventually(
        "Active=False ScaledToZero",
        Duration::from_secs(60),
        || async {
            let f = functions.get("web-lazy").await.ok()?;
            (f.condition(CONDITION_ACTIVE)?.reason == "ScaledToZero").then_some(())
        },
    )
    .await;
    eprintln!("ok: the Deployment is at zero");

    // A request through the activator wakes it and is answered by the Deployment's pod;
    // the Deployment's own Service works again while it has replicas.
    let gw = gateway(&cluster, &install, &ns.name, "web-lazy").await;
    let cold = first_answer(&gw, "/").await;
    assert_woken(&cold, "web-lazy");
    assert!(cold.body.starts_with("host=web-"), "{}", cold.body);
    // The activator may answer before the pod's slices say ready (it probes a waking
    // Function's pods itself): the own Service follows once its slice catches up.
    let again = eventually(
        "the own Service to answer",
        Duration::from_secs(60),
        || async { get(own_gw.addr, &own_gw.host, "/").await.ok() },
    )
    .await;
    assert_eq!(again.status, 200);
    eprintln!("ok: woken from zero through the activator");

    // Load scales it, every request answered; then idleness takes it back to zero.
    let (peak, sent) = scale_under_load(&cluster, &install, &ns.name, "web-lazy", "web").await;
    eprintln!("ok: scaled to {peak} under load, {sent} requests");
    eventually("back to zero", Duration::from_secs(90), || async {
        (replicas(&deployments, "web").await.0 == 0).then_some(())
    })
    .await;

    // A second Function naming the Deployment: the older one keeps it.
    let mut second = function.clone();
    second["metadata"]["name"] = json!("web-too");
    apply(&second).expect("the second Function applies");
    let conflict = eventually("TargetConflict", Duration::from_secs(60), || async {
        let f = functions.get("web-too").await.ok()?;
        let active = f.condition(CONDITION_ACTIVE)?.clone();
        (active.reason == "TargetConflict").then_some(active)
    })
    .await;
    assert!(
        conflict.message.contains("web-lazy"),
        "{}",
        conflict.message
    );
    kubectl(&["delete", "function", "web-too", "-n", &ns.name], None).expect("deleted");

    // GitOps: the manifest applied again with replicas fights the autoscaler; the
    // Function says so with an Event.
    let mut with_replicas = deployment.clone();
    with_replicas["spec"]["replicas"] = json!(2);
    apply(&with_replicas).expect("the Deployment applies");
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &ns.name);
    let fight = eventually(
        "a ReplicasOverridden Event",
        Duration::from_secs(60),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("ReplicasOverridden")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-lazy")
            })
        },
    )
    .await;
    eprintln!(
        "ok: the fight is reported: {}",
        fight.note.unwrap_or_default()
    );
    apply(&deployment).expect("the Deployment applies without replicas again");

    // Deleting the Function gives the Deployment back the 1 replica it had, and the
    // user's Service is untouched and answers.
    functions
        .delete("web-lazy", &DeleteParams::default())
        .await
        .expect("delete the Function");
    eventually(
        "the Function to be gone",
        Duration::from_secs(60),
        || async {
            functions
                .get_opt("web-lazy")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    wait_ready_replicas(&deployments, "web", 1).await;
    let after = own.get("web").await.expect("the user's Service");
    assert_eq!(after.metadata.uid, user_service.metadata.uid);
    assert_eq!(
        after.spec.as_ref().and_then(|s| s.selector.clone()),
        user_service.spec.as_ref().and_then(|s| s.selector.clone())
    );
    let reply = first_answer(&own_gw, "/").await;
    assert_eq!(reply.status, 200);
    eventually(
        "the Function's Services to be collected",
        Duration::from_secs(60),
        || async {
            (own.get_opt("web-lazy").await.ok()?.is_none()
                && own.get_opt("web-lazy-private").await.ok()?.is_none())
            .then_some(())
        },
    )
    .await;
    eprintln!("ok: deleting the Function gave the Deployment back");
    drop(own_gw);
    drop(gw);
    drop(ns);
    drop(install);
    wait_namespace_gone(&cluster, &system).await;
}

fn services_of(cluster: &Cluster, namespace: &str) -> Api<Service> {
    Api::namespaced(cluster.client.clone(), namespace)
}

// ------------------------------------------------ cold starts below the platform floor
//
// The activator watches a waking Function's pods and probes a new one itself, so the
// first request is answered before the EndpointSlice says the pod is ready (issue 15).

/// The `name` counter with label `outcome`, summed over every activator of `install`
/// (their `/metrics` on the admin port, reached at the pod IP).
async fn activator_counter(cluster: &Cluster, install: &Install, name: &str, outcome: &str) -> u64 {
    let prefix = format!("{name}{{outcome=\"{outcome}\"}} ");
    let mut sum = 0;
    for pod in install.pods(cluster, "activator").await {
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        let Ok(addr) = format!("{ip}:9090").parse() else {
            continue;
        };
        if let Ok(r) = get(addr, "metrics", "/metrics").await {
            sum += r
                .body
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
        }
    }
    sum
}

/// Whether every activator of `install` routes new requests to every address the private
/// slices of Function `name` list as ready (each activator's `/drain-status` says which
/// of the given addresses it routes): until then, a request that reaches one whose watch
/// has not caught up waits for a replica, a cold start to it.
async fn every_activator_routes(
    cluster: &Cluster,
    install: &Install,
    namespace: &str,
    name: &str,
) -> bool {
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), namespace);
    let Ok(list) = slices
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("kubernetes.io/service-name={name}-private")),
        )
        .await
    else {
        return false;
    };
    let ready: Vec<String> = list
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    let activators = install.pods(cluster, "activator").await;
    if ready.is_empty() || activators.is_empty() {
        return false;
    }
    let path = format!("/drain-status?ips={}", ready.join(","));
    for pod in activators {
        let Some(addr) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| format!("{ip}:9090").parse().ok())
        else {
            return false;
        };
        let Ok(reply) = get(addr, "drain-status", &path).await else {
            return false;
        };
        let routed = serde_json::from_str::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v["routed"].as_array().map(Vec::len))
            .unwrap_or(0);
        if routed < ready.len() {
            return false;
        }
    }
    true
}

/// Addresses the private Service's slices of Function `name` list as ready.
async fn ready_in_slices(cluster: &Cluster, namespace: &str, name: &str) -> usize {
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), namespace);
    let list = slices
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("kubernetes.io/service-name={name}-private")),
        )
        .await
        .expect("listing the private slices");
    list.items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count()
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn a_function_at_zero_is_answered_before_its_endpointslice_says_ready() {
    let test = "a_function_at_zero_is_answered_before_its_endpointslice_says_ready";
    let Some((cluster, ns, install)) = namespaced_chart(
        test,
        "zeroscale-e2e-early",
        json!({"operator": {"replicas": 1}, "activator": {"coldStartProbe": true}}),
    )
    .await
    else {
        return;
    };
    let system = install.namespace.clone();

    // The pod read is watch and list, nothing more.
    let can = |verb: &str| {
        kubectl(
            &[
                "auth",
                "can-i",
                verb,
                "pods",
                "-n",
                &ns.name,
                &format!("--as=system:serviceaccount:{system}:{}", install.activator),
            ],
            None,
        )
        .is_ok_and(|out| out.trim() == "yes")
    };
    assert!(can("watch") && can("list"), "the activator watches pods");
    assert!(!can("get") && !can("delete") && !can("patch"));

    // A readiness probe the kubelet first runs 20 s after the start: the platform says
    // ready only then, the activator's own check passes as soon as the app listens.
    let mut f = test_function(
        &ns.name,
        "early",
        json!({"scale": {"min": 0, "max": 1, "idleTimeout": "120s"}}),
    );
    f["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = json!({
        "tcpSocket": {"port": 8080}, "initialDelaySeconds": 20, "periodSeconds": 5
    });
    apply(&f).expect("the Function applies");
    wait_ready_condition(&cluster, &ns.name, "early").await;
    let gw = gateway(&cluster, &install, &ns.name, "early").await;

    let started = tokio::time::Instant::now();
    let reply = first_answer(&gw, "/").await;
    let took = started.elapsed();
    assert_woken(&reply, "early");
    assert_eq!(
        ready_in_slices(&cluster, &ns.name, "early").await,
        0,
        "answered in {took:?}, before the slice listed the pod ready"
    );
    assert!(
        activator_counter(
            &cluster,
            &install,
            "zeroscale_activator_early_requests_total",
            "answered"
        )
        .await
            >= 1,
        "the activator says it served the request early"
    );
    eprintln!("ok: answered from zero in {took:?}, before the EndpointSlice said ready");

    // The slice catches up; its view routes from then on, in every activator.
    eventually(
        "every activator to route the pod the slice lists ready",
        Duration::from_secs(90),
        || async {
            every_activator_routes(&cluster, &install, &ns.name, "early")
                .await
                .then_some(())
        },
    )
    .await;
    let warm = get(gw.addr, &gw.host, "/").await.expect("a warm answer");
    assert_eq!(warm.status, 200, "{warm:?}");
    assert!(warm.headers.get(COLD_START_HEADER).is_none(), "{warm:?}");
    assert_eq!(warm.body, reply.body, "the same pod");

    drop(gw);
    drop(ns);
    drop(install);
    wait_namespace_gone(&cluster, &system).await;
}

// ------------------------------------------------------------ cold-start benchmark
//
// `make bench-coldstart` (or this test by name): wakes from zero next to the platform floor
// measured in the same run, interleaved round by round so they share the machine's load.

/// The benchmark's app: the suite's test app that also says, in headers of every answer,
/// when its process started and when it listened (wall clock, seconds; the stand-in runs
/// pods on this host, so the clocks are the same).
const BENCH_APP: &str = r#"
import os, time
def started():
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return time.time() - (up - ticks / os.sysconf("SC_CLK_TCK"))
START = started()
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("host=%s\n" % os.environ.get("HOSTNAME", "")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-App-Start", "%f" % START)
        self.send_header("X-App-Listen", "%f" % LISTEN)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("", int(os.environ["PORT"])), H)
LISTEN = time.time()
server.serve_forever()
"#;

/// The benchmark app's pod spec. With `probe`, one readiness probe, as most apps have (a
/// TCP connect every second: the kubelet's first check, at the start, finds the app not
/// listening yet); without, the kubelet calls the pod ready as soon as its container runs,
/// before the app listens.
fn bench_pod_spec(probe: bool) -> serde_json::Value {
    let mut spec = json!({
        "terminationGracePeriodSeconds": 2,
        "containers": [{
            "name": "app",
            "image": "python:3.12-alpine",
            "command": ["python3", "-u", "-c", BENCH_APP],
            "env": [{"name": "PORT", "value": "8080"}],
            "ports": [{"containerPort": 8080}],
        }],
    });
    if probe {
        spec["containers"][0]["readinessProbe"] =
            json!({"tcpSocket": {"port": 8080}, "periodSeconds": 1});
    }
    spec
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One wake, in seconds from its start: the app's process started, it listened, done
/// (answered, or listed ready for the floor).
#[derive(Debug, Clone, Copy)]
struct Wake {
    start: f64,
    listen: f64,
    done: f64,
}

/// When the app answering `reply` started and listened (epoch seconds).
fn app_times(reply: &Reply) -> (f64, f64) {
    let header = |name: &str| -> f64 {
        reply
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {reply:?}"))
    };
    (header("x-app-start"), header("x-app-listen"))
}

/// The IP of the one running pod selected by `labels`.
async fn pod_ip(cluster: &Cluster, namespace: &str, labels: &str) -> String {
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(cluster.client.clone(), namespace);
    eventually("the pod's IP", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&kube::api::ListParams::default().labels(labels))
                .await
                .ok()?;
            list.items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .find_map(|p| p.status.as_ref()?.pod_ip.clone())
        }
    })
    .await
}

/// Waits until no pod matches `labels` (the last wake's pod is gone).
async fn no_pods(cluster: &Cluster, namespace: &str, labels: &str) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(cluster.client.clone(), namespace);
    eventually("the pods to be gone", Duration::from_secs(120), || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&kube::api::ListParams::default().labels(labels))
                .await
                .ok()?;
            list.items.is_empty().then_some(())
        }
    })
    .await;
}

/// The floor: scale the plain Deployment `floor` 0 -> 1 and wait, on a watch, until its
/// Service's EndpointSlice lists the pod ready; then back to zero.
async fn floor_wake(cluster: &Cluster, namespace: &str) -> Wake {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), namespace);
    let stream = watcher::watcher(
        slices,
        watcher::Config::default().labels("kubernetes.io/service-name=floor"),
    );
    futures::pin_mut!(stream);
    let ready = |s: &EndpointSlice| {
        s.endpoints
            .iter()
            .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
    };
    while let Some(event) = stream.next().await {
        if matches!(event, Ok(watcher::Event::InitDone)) {
            break;
        }
    }
    let t0 = now_epoch();
    deployments
        .patch_scale(
            "floor",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .expect("scaling the floor Deployment");
    let done = loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(watcher::Event::Apply(s)))) if ready(&s) => break now_epoch(),
            Ok(Some(_)) => {}
            _ => panic!("the floor pod was not listed ready within 60 s"),
        }
    };
    let ip = pod_ip(cluster, namespace, "app=floor").await;
    let addr = format!("{ip}:8080").parse().expect("a pod IP");
    // Without a readiness probe the slice may say ready before the app listens.
    let reply = eventually(
        "the floor app to answer",
        Duration::from_secs(30),
        || async { get(addr, "floor", "/").await.ok() },
    )
    .await;
    let (start, listen) = app_times(&reply);
    deployments
        .patch_scale(
            "floor",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .expect("scaling the floor Deployment down");
    no_pods(cluster, namespace, "app=floor").await;
    Wake {
        start: start - t0,
        listen: listen - t0,
        done: done - t0,
    }
}

/// A request to Function `name` at zero: the wake as its client sees it, or what it got
/// instead of a 200. Then waits until it is back at zero (its idle timeout) with no pod
/// left.
async fn function_wake(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    gw: &Gateway,
) -> Result<Wake, String> {
    let t0 = now_epoch();
    let reply = get(gw.addr, &gw.host, "/").await;
    let done = now_epoch();
    let labels = format!("{FUNCTION_LABEL}={name}");
    // Back to zero: the idle timeout, the pod gone, the slice empty.
    let back_to_zero = async {
        no_pods(cluster, namespace, &labels).await;
        eventually("the slice to be empty", Duration::from_secs(60), || async {
            (ready_in_slices(cluster, namespace, name).await == 0).then_some(())
        })
        .await;
    };
    match reply {
        Ok(reply) if reply.status == 200 => {
            assert_woken(&reply, name);
            let (start, listen) = app_times(&reply);
            back_to_zero.await;
            Ok(Wake {
                start: start - t0,
                listen: listen - t0,
                done: done - t0,
            })
        }
        other => {
            back_to_zero.await;
            Err(format!("{other:?}"))
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One row: median and p95 of the total, and medians of its parts, in ms; and how many
/// wakes got something else than a 200.
fn summary(what: &str, wakes: &[Wake], errors: usize) -> (f64, String) {
    let col = |f: &dyn Fn(&Wake) -> f64| {
        let mut v: Vec<f64> = wakes.iter().map(|w| f(w) * 1000.0).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let total = col(&|w| w.done);
    let median = percentile(&total, 50.0);
    let row = format!(
        "| {what} | {} | {errors} | {median:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        wakes.len() + errors,
        percentile(&total, 95.0),
        percentile(&col(&|w| w.start), 50.0),
        percentile(&col(&|w| w.listen - w.start), 50.0),
        percentile(&col(&|w| w.done - w.listen), 50.0),
    );
    (median, row)
}

#[tokio::test]
#[ignore = "a benchmark on a Kubernetes cluster (make bench-coldstart)"]
async fn bench_cold_start_against_the_platform_floor() {
    let test = "bench_cold_start_against_the_platform_floor";
    let Some(cluster) = cluster(test).await else {
        return;
    };
    let wakes: usize = std::env::var("ZEROSCALE_BENCH_WAKES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // `none`: the app without a readiness probe (the floor then does not wait for it).
    let probe = std::env::var("ZEROSCALE_BENCH_READINESS").as_deref() != Ok("none");
    eprintln!(
        "{wakes} wakes of each; the app {}",
        if probe {
            "with a tcpSocket readiness probe, periodSeconds 1"
        } else {
            "without a readiness probe"
        }
    );
    remove_leftovers(&cluster).await;
    install_crd(&cluster, &["--server-side", "--force-conflicts"]).await;
    // Two installs side by side, the fast path on and off, each serving its own namespace
    // (an install serves every Function of the namespaces it watches), and the floor's
    // plain Deployment in a third: the same app everywhere.
    let mut modes = Vec::new();
    for fast in [true, false] {
        let ns = TestNamespace::new(&cluster, "zeroscale-bench-cold").await;
        let (release, system) = release_names();
        let install = Install::chart(
            &cluster,
            &release,
            &system,
            json!({
                "watchNamespaces": [ns.name],
                "operator": {"replicas": 1},
                "activator": {"replicas": 1, "coldStartProbe": fast},
                "logging": {"level": "info"},
            }),
        )
        .await;
        modes.push((fast, ns, install, system));
    }
    let floor_ns = TestNamespace::new(&cluster, "zeroscale-bench-floor").await;
    apply(&json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "floor", "namespace": floor_ns.name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "floor"}},
            "template": {"metadata": {"labels": {"app": "floor"}}, "spec": bench_pod_spec(probe)},
        },
    }))
    .expect("the floor Deployment applies");
    apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "floor", "namespace": floor_ns.name},
        "spec": {"selector": {"app": "floor"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .expect("the floor Service applies");
    let mut gateways = Vec::new();
    for (_, ns, install, _) in &modes {
        install.wait_ready(&cluster).await;
        apply(&json!({
            "apiVersion": "zeroscale.dev/v1alpha1",
            "kind": "Function",
            "metadata": {"name": "bench", "namespace": ns.name},
            "spec": {
                "template": {"spec": bench_pod_spec(probe)},
                "scale": {"min": 0, "max": 1, "idleTimeout": "1s"},
            },
        }))
        .expect("the Function applies");
        wait_ready_condition(&cluster, &ns.name, "bench").await;
        let gw = gateway(&cluster, install, &ns.name, "bench").await;
        // A first wake, not counted: the Service proxy and the activator's connections
        // set up, and the Function back at zero.
        let first = first_answer(&gw, "/").await;
        eprintln!("first wake (not counted): {}", first.status);
        let labels = format!("{FUNCTION_LABEL}=bench");
        no_pods(&cluster, &ns.name, &labels).await;
        eventually("the slice to be empty", Duration::from_secs(60), || async {
            (ready_in_slices(&cluster, &ns.name, "bench").await == 0).then_some(())
        })
        .await;
        gateways.push(gw);
    }

    let (mut floor, mut on, mut off) = (Vec::new(), Vec::new(), Vec::new());
    let (mut on_errors, mut off_errors) = (Vec::new(), Vec::new());
    let ms = |w: &Result<Wake, String>| match w {
        Ok(w) => format!("{:.0} ms", w.done * 1e3),
        Err(e) => format!("ERROR {e}"),
    };
    for round in 0..wakes {
        let f = floor_wake(&cluster, &floor_ns.name).await;
        floor.push(f);
        let mut line = format!("round {round}: floor {:.0} ms", f.done * 1e3);
        for ((fast, ns, _, _), gw) in modes.iter().zip(&gateways) {
            let w = function_wake(&cluster, &ns.name, "bench", gw).await;
            line += &format!(
                ", fast path {} {}",
                if *fast { "on" } else { "off" },
                ms(&w)
            );
            let (wakes, errors) = if *fast {
                (&mut on, &mut on_errors)
            } else {
                (&mut off, &mut off_errors)
            };
            match w {
                Ok(w) => wakes.push(w),
                Err(e) => errors.push(e),
            }
        }
        eprintln!("{line}");
    }
    let (floor_median, floor_row) =
        summary("platform floor (slice lists the pod ready)", &floor, 0);
    let (on_median, on_row) = summary("zeroscale, fast path on (answered)", &on, on_errors.len());
    let (off_median, off_row) = summary(
        "zeroscale, fast path off (answered)",
        &off,
        off_errors.len(),
    );
    eprintln!(
        "\n| wakes from zero | n | not 200 | median ms | p95 ms | to process start (median) | app start to listen (median) | listen to done (median) |\n|---|---|---|---|---|---|---|---|\n{floor_row}\n{on_row}\n{off_row}\n"
    );
    eprintln!(
        "fast path vs floor: {:+.1}% (goal <= -30%); without it: {:+.1}%",
        (on_median / floor_median - 1.0) * 100.0,
        (off_median / floor_median - 1.0) * 100.0
    );
    if probe {
        // With a readiness probe, every wake is answered, early or not.
        assert!(
            on_errors.is_empty() && off_errors.is_empty(),
            "{on_errors:?} {off_errors:?}"
        );
    }
    assert_eq!(
        activator_counter(
            &cluster,
            &modes[1].2,
            "zeroscale_activator_early_requests_total",
            "answered"
        )
        .await,
        0,
        "the install without the fast path used none"
    );

    drop(gateways);
    drop(floor_ns);
    let mut systems = Vec::new();
    for (_, ns, install, system) in modes {
        drop(ns);
        drop(install);
        systems.push(system);
    }
    for system in systems {
        wait_namespace_gone(&cluster, &system).await;
    }
}
