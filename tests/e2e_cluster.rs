//! The real-cluster suite (`make e2e`): any cluster in KUBECONFIG (kind, k3d, a dev
//! cluster). Each test applies the CRD, runs the built `zeroscale operator` binary against
//! its own namespace, and checks what a user sees: the owned objects, the status, and
//! garbage collection on delete. Without a reachable cluster each test prints a note and
//! passes; with `ZEROSCALE_E2E_REQUIRE=1` it fails instead.
//!
//! The activator is not deployed here: a selector-less Service with a hand-written
//! EndpointSlice (a TEST-NET address that no traffic is ever sent to) stands in for it,
//! which is all the operator reads of the activator.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};
use zeroscale::api::{CONDITION_ACTIVE, CONDITION_READY, FUNCTION_LABEL, Function};

const MANAGER: &str = "zeroscale-e2e";
const DEADLINE: Duration = Duration::from_secs(90);

/// A client for the cluster in KUBECONFIG, or `None` (skip) when there is none.
async fn cluster(test: &str) -> Option<Client> {
    let required = std::env::var("ZEROSCALE_E2E_REQUIRE").is_ok_and(|v| v == "1");
    let connect = async {
        let client = Client::try_default().await.map_err(|e| e.to_string())?;
        client
            .apiserver_version()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(client)
    };
    match timeout(Duration::from_secs(15), connect).await {
        Ok(Ok(client)) => Some(client),
        Ok(Err(e)) => skip(test, required, &e),
        Err(_) => skip(test, required, "timed out connecting"),
    }
}

fn skip(test: &str, required: bool, why: &str) -> Option<Client> {
    assert!(
        !required,
        "{test}: ZEROSCALE_E2E_REQUIRE=1 but no cluster is reachable: {why}"
    );
    eprintln!("SKIPPED {test}: no Kubernetes cluster reachable via KUBECONFIG ({why})");
    None
}

/// Polls `check` until it returns `Some` or the deadline passes.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(500)).await;
    }
}

async fn apply_crd(client: &Client) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/function.yaml"))
        .unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &crd.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("the CRD applies");
    eventually("the CRD to be established", || {
        let api = api.clone();
        let name = crd.name_any();
        async move {
            let crd = api.get(&name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await;
}

/// A fresh namespace, deleted when dropped (best effort).
struct TestNamespace {
    client: Client,
    name: String,
}

impl TestNamespace {
    async fn new(client: &Client) -> Self {
        let name = format!("zeroscale-e2e-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns).await.unwrap();
        Self {
            client: client.clone(),
            name,
        }
    }
}

impl TestNamespace {
    /// Deletes the namespace (and so everything the test left in it).
    async fn delete(self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(&self.name, &DeleteParams::default()).await;
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let client = self.client.clone();
        let name = self.name.clone();
        // Runs on the test's runtime while it is still alive; failures are harmless.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let api: Api<Namespace> = Api::all(client);
                let _ = api.delete(&name, &DeleteParams::default()).await;
            });
        }
    }
}

/// A stand-in for the activator Service: one ready endpoint on port `http`.
async fn fake_activator(client: &Client, ns: &str) -> String {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "fake-activator"},
        "spec": {"ports": [{"name": "http", "port": 8080}]}
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "fake-activator-1", "labels": {
            "kubernetes.io/service-name": "fake-activator",
            "endpointslice.kubernetes.io/managed-by": "e2e.zeroscale.dev"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.10"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))
    .unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();
    format!("{ns}/fake-activator")
}

/// The built operator binary, watching only `ns`, without leader election.
fn run_operator(ns: &str, activator: &str) -> Child {
    run_operator_with(ns, activator, &["--leader-elect", "false"])
}

fn run_operator_with(ns: &str, activator: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_zeroscale"))
        .args([
            "operator",
            "--namespace",
            ns,
            "--activator-service",
            activator,
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env("RUST_LOG", "info,zeroscale=debug")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the zeroscale binary runs")
}

fn hello(ns: &str) -> Function {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello.yaml"))
        .unwrap();
    let mut f: Function = serde_yaml::from_str(&text).unwrap();
    f.metadata.namespace = Some(ns.into());
    f
}

async fn apply_function(client: &Client, f: &Function) {
    let api: Api<Function> =
        Api::namespaced(client.clone(), f.metadata.namespace.as_deref().unwrap());
    api.patch(
        &f.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(f),
    )
    .await
    .expect("the Function applies");
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn operator_creates_routes_reports_and_garbage_collects() {
    let Some(client) = cluster("operator_creates_routes_reports_and_garbage_collects").await else {
        return;
    };
    apply_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let activator = fake_activator(&client, &ns.name).await;
    let mut operator = run_operator(&ns.name, &activator);
    let f = hello(&ns.name);
    apply_function(&client, &f).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns.name);
    let functions: Api<Function> = Api::namespaced(client.clone(), &ns.name);

    let d = eventually("the Deployment", || async {
        deployments.get_opt("hello").await.ok().flatten()
    })
    .await;
    let spec = d.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(0), "created at scale.min, idle");
    assert_eq!(
        spec.selector.match_labels,
        Some(BTreeMap::from([(FUNCTION_LABEL.into(), "hello".into())]))
    );
    let owner = &d.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Function", Some(true))
    );

    let private = eventually("the private Service", || async {
        services.get_opt("hello-private").await.ok().flatten()
    })
    .await;
    let pspec = private.spec.unwrap();
    assert_eq!(pspec.ports.unwrap()[0].port, 8080);
    let public = eventually("the public Service", || async {
        services.get_opt("hello").await.ok().flatten()
    })
    .await;
    let public_spec = public.spec.unwrap();
    assert!(public_spec.selector.is_none());
    assert_eq!(public_spec.ports.unwrap()[0].port, 80);
    let slice = eventually("the activator EndpointSlice", || async {
        let s = slices.get_opt("hello-activator").await.ok().flatten()?;
        (!s.endpoints.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(slice.endpoints[0].addresses, vec!["192.0.2.10".to_string()]);
    assert_eq!(slice.ports.unwrap()[0].name.as_deref(), Some("http"));

    let f = eventually("Ready=True on the status", || async {
        let f = functions.get("hello").await.ok()?;
        let ready = f.condition(CONDITION_READY)?;
        (ready.status == "True").then_some(f)
    })
    .await;
    let status = f.status.clone().unwrap();
    assert_eq!(
        status.url.as_deref(),
        Some(format!("http://hello.{}.svc.cluster.local", ns.name).as_str())
    );
    assert_eq!(status.observed_generation, f.metadata.generation);
    assert_eq!(
        f.condition(CONDITION_ACTIVE).map(|c| c.reason.as_str()),
        Some("ScaledToZero")
    );

    // Drift: someone deletes the public Service; the operator puts it back.
    services
        .delete("hello", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the public Service to be recreated", || async {
        let s = services.get_opt("hello").await.ok().flatten()?;
        s.metadata.deletion_timestamp.is_none().then_some(())
    })
    .await;

    // Delete: the garbage collector removes everything the Function owned.
    functions
        .delete("hello", &DeleteParams::default())
        .await
        .unwrap();
    eventually("garbage collection", || async {
        let gone = deployments.get_opt("hello").await.ok()?.is_none()
            && services.get_opt("hello").await.ok()?.is_none()
            && services.get_opt("hello-private").await.ok()?.is_none()
            && slices.get_opt("hello-activator").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    let _ = operator.kill().await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn a_template_the_api_server_refuses_is_reported_on_the_status() {
    let Some(client) = cluster("a_template_the_api_server_refuses_is_reported_on_the_status").await
    else {
        return;
    };
    apply_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let activator = fake_activator(&client, &ns.name).await;
    let mut operator = run_operator(&ns.name, &activator);
    let mut f = hello(&ns.name);
    // Container names must be DNS labels; only the API server says so.
    f.spec.template.as_mut().unwrap().0["spec"]["containers"][0]["name"] = json!("Not_A_Label");
    apply_function(&client, &f).await;
    let functions: Api<Function> = Api::namespaced(client.clone(), &ns.name);
    let ready = eventually("Ready=False InvalidSpec", || async {
        let f = functions.get("hello").await.ok()?;
        let ready = f.condition(CONDITION_READY)?.clone();
        (ready.reason == "InvalidSpec").then_some(ready)
    })
    .await;
    assert_eq!(ready.status, "False");
    assert!(ready.message.contains("Not_A_Label"), "{}", ready.message);
    let _ = operator.kill().await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn a_standby_operator_takes_over_when_the_leader_dies() {
    use k8s_openapi::api::coordination::v1::Lease;
    let Some(client) = cluster("a_standby_operator_takes_over_when_the_leader_dies").await else {
        return;
    };
    apply_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let activator = fake_activator(&client, &ns.name).await;
    let elect = |id: &str| -> Vec<String> {
        [
            "--leader-elect",
            "true",
            "--lease-namespace",
            &ns.name,
            "--pod-name",
            id,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (args_a, args_b) = (elect("operator-a"), elect("operator-b"));
    let a_args: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let b_args: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let mut a = run_operator_with(&ns.name, &activator, &a_args);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = || async {
        leases
            .get_opt("zeroscale-operator")
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    };
    eventually("operator-a to lead", || async {
        (holder().await.as_deref() == Some("operator-a")).then_some(())
    })
    .await;
    let mut b = run_operator_with(&ns.name, &activator, &b_args);

    // The leader dies without releasing the lease (SIGKILL).
    a.kill().await.unwrap();
    eventually("operator-b to take over", || async {
        (holder().await.as_deref() == Some("operator-b")).then_some(())
    })
    .await;
    // ...and it does the work: a new Function gets its Deployment.
    apply_function(&client, &hello(&ns.name)).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually("the new leader to reconcile", || async {
        deployments.get_opt("hello").await.ok().flatten()
    })
    .await;
    let _ = b.kill().await;
    ns.delete().await;
}

/// examples/existing-deployment.yaml in `ns`: the user's Deployment and Service, and the
/// Function pointing at the Deployment.
fn existing_deployment_example(ns: &str) -> (Deployment, Service, Function) {
    use serde::Deserialize;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/existing-deployment.yaml"
    ))
    .unwrap();
    let mut docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect();
    for d in &mut docs {
        d["metadata"]["namespace"] = json!(ns);
    }
    (
        serde_json::from_value(docs[0].clone()).unwrap(),
        serde_json::from_value(docs[1].clone()).unwrap(),
        serde_json::from_value(docs[2].clone()).unwrap(),
    )
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn the_api_server_refuses_what_the_operator_refuses_about_scale_targets() {
    let Some(client) =
        cluster("the_api_server_refuses_what_the_operator_refuses_about_scale_targets").await
    else {
        return;
    };
    apply_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let functions: Api<Function> = Api::namespaced(client.clone(), &ns.name);
    let (_, _, good) = existing_deployment_example(&ns.name);
    let template = json!({"spec": {"containers": [{"name": "app", "image": "x"}]}});
    let target = json!({"kind": "Deployment", "name": "web"});
    // (the field the API server's message must name first, the spec)
    let cases = [
        ("spec.template", json!({"port": 8080})),
        (
            "spec.scaleTargetRef",
            json!({"template": template, "scaleTargetRef": target, "port": 8080}),
        ),
        ("spec.port", json!({"scaleTargetRef": target})),
        (
            "spec.scaleTargetRef.kind",
            json!({"scaleTargetRef": {"kind": "DaemonSet", "name": "web"}, "port": 8080}),
        ),
        (
            "spec.scaleTargetRef.name",
            json!({"scaleTargetRef": {"kind": "Deployment", "name": "Web_App"}, "port": 8080}),
        ),
    ];
    for (field, spec) in cases {
        let mut f = good.clone();
        f.spec = serde_json::from_value(spec.clone()).unwrap();
        let runtime = zeroscale::api::config::validate(&f.spec).expect_err("refused at runtime");
        assert!(runtime.mentions(field), "runtime: {runtime}");
        let err = functions
            .create(&PostParams::default(), &f)
            .await
            .expect_err("refused at admission");
        let message = match &err {
            kube::Error::Api(s) => s.message.clone(),
            other => other.to_string(),
        };
        assert!(
            message.contains(field),
            "{spec}: the API server's message should name {field}: {message}"
        );
    }
    functions
        .create(&PostParams::default(), &good)
        .await
        .expect("a valid scaleTargetRef Function is admitted");
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (make e2e)"]
async fn a_function_takes_an_existing_deployment_and_gives_it_back_on_delete() {
    use k8s_openapi::api::events::v1::Event;
    let Some(client) =
        cluster("a_function_takes_an_existing_deployment_and_gives_it_back_on_delete").await
    else {
        return;
    };
    apply_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let activator = fake_activator(&client, &ns.name).await;
    let mut operator = run_operator(&ns.name, &activator);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let functions: Api<Function> = Api::namespaced(client.clone(), &ns.name);
    let (mut deployment, service, f) = existing_deployment_example(&ns.name);

    // The Function first: its target does not exist yet.
    apply_function(&client, &f).await;
    eventually("TargetNotFound", || async {
        let f = functions.get("web-lazy").await.ok()?;
        (f.condition(CONDITION_ACTIVE)?.reason == "TargetNotFound").then_some(())
    })
    .await;

    // The user's Deployment (created with 2 replicas) and Service appear.
    deployment.spec.as_mut().unwrap().replicas = Some(2);
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let user_service = services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let held = eventually("the Function to hold the Deployment", || async {
        let f = functions.get("web-lazy").await.ok()?;
        (f.status.as_ref()?.selector.as_deref() == Some("app=web")).then_some(f)
    })
    .await;
    assert_eq!(
        held.metadata.finalizers.as_deref(),
        Some(&["zeroscale.dev/scale-back".to_string()][..])
    );
    let private = services.get("web-lazy-private").await.unwrap();
    assert_eq!(
        private.spec.as_ref().unwrap().selector,
        Some(BTreeMap::from([("app".to_string(), "web".to_string())]))
    );
    assert!(private.annotations()["zeroscale.dev/scale-target"].contains("\"originalReplicas\":2"));
    let d = deployments.get("web").await.unwrap();
    assert!(
        d.owner_references().is_empty(),
        "the Deployment stays the user's"
    );
    assert!(!d.labels().contains_key(FUNCTION_LABEL));

    // A second Function naming the same Deployment: the older one keeps it.
    let mut second = f.clone();
    second.metadata.name = Some("web-too".into());
    apply_function(&client, &second).await;
    let conflict = eventually("TargetConflict", || async {
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

    // Idle: the autoscaler takes it to zero through the scale subresource.
    let mut scale = deployments.get_scale("web").await.unwrap();
    scale.spec.as_mut().unwrap().replicas = Some(0);
    scale.status = None;
    deployments
        .replace_scale(
            "web",
            &PostParams {
                field_manager: Some("zeroscale-autoscaler".into()),
                ..PostParams::default()
            },
            &scale,
        )
        .await
        .unwrap();
    // A GitOps tool applies the manifest with replicas: it fights the autoscaler, and the
    // Function says so.
    tokio::time::sleep(Duration::from_secs(1)).await;
    deployments
        .patch(
            "web",
            &PatchParams::apply("e2e-gitops").force(),
            &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                                 "metadata": {"name": "web"}, "spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let fight = eventually("a ReplicasOverridden Event", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("ReplicasOverridden")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-lazy")
        })
    })
    .await;
    assert!(
        fight
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("e2e-gitops"),
        "{:?}",
        fight.note
    );

    // Deleting the Function gives the Deployment its 2 replicas back, and then the
    // Function goes; the user's Deployment and Service stay.
    functions
        .delete("web-lazy", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Function to be gone", || async {
        functions
            .get_opt("web-lazy")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let d = deployments.get("web").await.unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(2), "scaled back");
    let svc = services.get("web").await.unwrap();
    assert_eq!(svc.metadata.uid, user_service.metadata.uid);
    assert_eq!(
        svc.metadata.resource_version, user_service.metadata.resource_version,
        "the user's Service is untouched"
    );
    // The younger Function takes it now, remembering the 2 it was given back with.
    eventually("the second Function to take the Deployment", || async {
        let f = functions.get("web-too").await.ok()?;
        (f.status.as_ref()?.selector.as_deref() == Some("app=web")).then_some(())
    })
    .await;
    let private = services.get("web-too-private").await.unwrap();
    assert!(private.annotations()["zeroscale.dev/scale-target"].contains("\"originalReplicas\":2"));
    functions
        .delete("web-too", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the second Function to be gone", || async {
        functions
            .get_opt("web-too")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(deployments.get_opt("web").await.unwrap().is_some());
    let _ = operator.kill().await;
    ns.delete().await;
}
