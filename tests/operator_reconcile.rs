//! The API calls of one reconcile, against a fake API server behind kube's client
//! (tower-test mock): what is applied on create, that a steady state writes nothing, that
//! drift is repaired, what the status says, how an invalid spec and a refused object are
//! reported, conflict retries, and the owner references garbage collection relies on.

mod operator_support;

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use operator_support::{Call, FakeApi, client};
use serde_json::{Value, json};
use tokio::sync::watch;
use zeroscale::api::{Defaults, FUNCTION_LABEL, Function};
use zeroscale::operator::Error;
use zeroscale::operator::build::{ActivatorEndpoint, ActivatorEndpoints};
use zeroscale::operator::metrics::Metrics;
use zeroscale::operator::reconcile::{self, Context, RateLimiter, Settings, Stores};

const UID: &str = "0b7d1f4e-1111-2222-3333-444455556666";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/default/deployments/hello";
const PRIVATE: &str = "/api/v1/namespaces/default/services/hello-private";
const PUBLIC: &str = "/api/v1/namespaces/default/services/hello";
const SLICE: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/hello-activator";
const STATUS: &str = "/apis/zeroscale.dev/v1alpha1/namespaces/default/functions/hello/status";

/// The caches the controller's watches would fill (listed once, empty).
struct Caches {
    functions: Writer<Function>,
    deployments: Writer<Deployment>,
    services: Writer<Service>,
    slices: Writer<EndpointSlice>,
    pods: Writer<Pod>,
}

fn listed<K>() -> Writer<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut w = Writer::default();
    w.apply_watcher_event(&watcher::Event::Init);
    w.apply_watcher_event(&watcher::Event::InitDone);
    w
}

impl Default for Caches {
    fn default() -> Self {
        Self {
            functions: listed(),
            deployments: listed(),
            services: listed(),
            slices: listed(),
            pods: listed(),
        }
    }
}

fn put<K>(w: &mut Writer<K>, object: K)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    w.apply_watcher_event(&watcher::Event::Apply(object));
}

fn hello() -> Function {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello.yaml"))
        .unwrap();
    let mut f: Function = serde_yaml::from_str(&text).unwrap();
    f.metadata.uid = Some(UID.into());
    f.metadata.generation = Some(1);
    f.metadata.resource_version = Some("1".into());
    f
}

fn activators(ips: &[&str]) -> ActivatorEndpoints {
    ActivatorEndpoints {
        drain: None,
        port: 8080,
        address_type: "IPv4".into(),
        endpoints: ips
            .iter()
            .map(|ip| ActivatorEndpoint {
                ip: ip.to_string(),
                node_name: None,
                zone: None,
                target_ref: None,
            })
            .collect(),
    }
}

struct Harness {
    api: Arc<FakeApi>,
    caches: Caches,
    activators: watch::Sender<Option<ActivatorEndpoints>>,
    context: Arc<Context>,
}

fn harness() -> Harness {
    let api = Arc::new(FakeApi::default());
    let client = client(api.clone());
    let caches = Caches::default();
    let (tx, rx) = watch::channel(Some(activators(&["10.1.0.7", "10.1.0.9"])));
    let registry = prometheus::Registry::new();
    let context = Arc::new(Context {
        client: client.clone(),
        settings: Settings {
            cluster_domain: "cluster.local".into(),
            defaults: Defaults::default(),
        },
        stores: Stores {
            functions: caches.functions.as_reader(),
            deployments: caches.deployments.as_reader(),
            services: caches.services.as_reader(),
            slices: caches.slices.as_reader(),
            pods: caches.pods.as_reader(),
        },
        activators: rx,
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "zeroscale-operator".into(),
                instance: None,
            },
        ),
        metrics: Metrics::new(&registry).unwrap(),
        slice_limiter: RateLimiter::new(1000),
        failures: Default::default(),
        targets: Default::default(),
        fights: Default::default(),
    });
    Harness {
        api,
        caches,
        activators: tx,
        context,
    }
}

impl Harness {
    async fn reconcile(&self, f: &Function) -> Result<Action, Error> {
        reconcile::reconcile(Arc::new(f.clone()), self.context.clone()).await
    }

    /// Copies what the fake API holds into the caches (what the watches would do) and
    /// returns the Function with the status the reconciler wrote.
    fn sync_caches(&mut self, f: &Function) -> Function {
        if let Some(d) = self.api.object::<Deployment>(DEPLOYMENT) {
            put(&mut self.caches.deployments, d);
        }
        for path in [PRIVATE, PUBLIC] {
            if let Some(s) = self.api.object::<Service>(path) {
                put(&mut self.caches.services, s);
            }
        }
        if let Some(s) = self.api.object::<EndpointSlice>(SLICE) {
            put(&mut self.caches.slices, s);
        }
        let mut f = f.clone();
        if let Some(stored) = self
            .api
            .object::<Function>(STATUS.trim_end_matches("/status"))
        {
            f.status = stored.status;
        }
        f
    }

    /// Stores the Function in the fake API (so its status can be patched).
    fn store_function(&mut self, f: &Function) {
        self.api.objects.lock().unwrap().insert(
            STATUS.trim_end_matches("/status").to_string(),
            serde_json::to_value(f).unwrap(),
        );
        put(&mut self.caches.functions, f.clone());
    }
}

fn writes(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| c.is_write())
        .map(|c| (c.method.clone(), c.path.clone()))
        .collect()
}

fn the<'a>(calls: &'a [Call], method: &str, path: &str) -> &'a Call {
    calls
        .iter()
        .find(|c| c.method == method && c.path == path)
        .unwrap_or_else(|| panic!("no {method} {path} in {:#?}", writes(calls)))
}

fn condition<'a>(status_patch: &'a Call, type_: &str) -> &'a Value {
    status_patch.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"))
}

fn events(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| c.method == "POST" && c.path.contains("/events"))
        .map(|c| {
            (
                c.body["type"].as_str().unwrap_or_default().to_string(),
                c.body["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn create_path_applies_everything_with_one_field_manager_and_owner_refs() {
    let mut h = harness();
    let f = hello();
    h.store_function(&f);
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();

    for path in [DEPLOYMENT, PRIVATE, PUBLIC, SLICE] {
        let apply = the(&calls, "PATCH", path);
        assert!(
            apply.query.contains("fieldManager=zeroscale-operator")
                && apply.query.contains("force=true"),
            "server-side apply with the operator's manager: {}",
            apply.query
        );
        assert!(apply.body["apiVersion"].is_string() && apply.body["kind"].is_string());
        let owner = &apply.body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], UID, "garbage collection follows this");
        assert_eq!(owner["kind"], "Function");
        assert_eq!(owner["controller"], true);
    }
    // Created at scale.min = 0: an idle Function starts with no pod.
    assert_eq!(the(&calls, "PATCH", DEPLOYMENT).body["spec"]["replicas"], 0);
    let slice = &the(&calls, "PATCH", SLICE).body;
    assert_eq!(slice["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(slice["ports"][0]["name"], "http");

    let status = the(&calls, "PATCH", STATUS);
    assert!(status.query.contains("fieldManager=zeroscale-operator"));
    assert_eq!(
        status.body["status"]["url"],
        "http://hello.default.svc.cluster.local"
    );
    assert_eq!(status.body["status"]["observedGeneration"], 1);
    assert!(
        status.body["status"].get("desiredReplicas").is_none()
            && status.body["status"].get("lastRequestTime").is_none(),
        "the autoscaler's fields are left to its own field manager"
    );
    let ready = condition(status, "Ready");
    assert_eq!(ready["status"], "True");
    assert_eq!(ready["observedGeneration"], 1);
    let active = condition(status, "Active");
    assert_eq!(active["status"], "False");
    assert_eq!(active["reason"], "ScaledToZero");
    assert!(events(&calls).contains(&("Normal".into(), "Created".into())));
}

#[tokio::test]
async fn steady_state_makes_no_api_calls() {
    let mut h = harness();
    let f = hello();
    h.store_function(&f);
    h.reconcile(&f).await.unwrap();
    let f = h.sync_caches(&f);
    h.api.take_calls();

    let action = h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    assert!(calls.is_empty(), "steady state touched the API: {calls:#?}");
    assert_ne!(
        action,
        Action::await_change(),
        "a periodic re-check stays scheduled"
    );
}

#[tokio::test]
async fn drift_is_repaired_and_replicas_are_left_alone() {
    let mut h = harness();
    let f = hello();
    h.store_function(&f);
    h.reconcile(&f).await.unwrap();
    let f = h.sync_caches(&f);
    h.api.take_calls();

    // Someone edits the image and the autoscaler scaled the Deployment to 3 through the
    // scale subresource (a field manager of its own); someone deletes the public Service.
    let mut d: Deployment = h.api.object(DEPLOYMENT).unwrap();
    let spec = d.spec.as_mut().unwrap();
    spec.replicas = Some(3);
    spec.template.spec.as_mut().unwrap().containers[0].image = Some("evil:latest".into());
    d.metadata.managed_fields = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
            manager: Some("zeroscale-autoscaler".into()),
            operation: Some("Update".into()),
            fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
                json!({"f:spec": {"f:replicas": {}}}),
            )),
            ..Default::default()
        },
    ]);
    put(&mut h.caches.deployments, d.clone());
    h.api
        .objects
        .lock()
        .unwrap()
        .insert(DEPLOYMENT.into(), serde_json::to_value(&d).unwrap());
    let public: Service = h.api.object(PUBLIC).unwrap();
    h.caches
        .services
        .apply_watcher_event(&watcher::Event::Delete(public));
    h.api.objects.lock().unwrap().remove(PUBLIC);

    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    let repaired = the(&calls, "PATCH", DEPLOYMENT);
    assert_eq!(
        repaired.body["spec"]["template"]["spec"]["containers"][0]["image"],
        "python:3.12-alpine"
    );
    assert!(
        repaired.body["spec"].get("replicas").is_none(),
        "the autoscaler owns replicas now: never reset them"
    );
    the(&calls, "PATCH", PUBLIC);
    let mut patched: Vec<String> = writes(&calls)
        .into_iter()
        .filter(|(m, p)| m == "PATCH" && !p.contains("/events") && !p.ends_with("/status"))
        .map(|(_, p)| p)
        .collect();
    patched.sort();
    assert_eq!(
        patched,
        vec![PUBLIC.to_string(), DEPLOYMENT.to_string()],
        "only what drifted is written"
    );
}

#[tokio::test]
async fn an_activator_rollout_rewrites_only_the_slice() {
    let mut h = harness();
    let f = hello();
    h.store_function(&f);
    h.reconcile(&f).await.unwrap();
    let f = h.sync_caches(&f);
    h.api.take_calls();

    h.activators
        .send_replace(Some(activators(&["10.1.0.7", "10.1.0.12"])));
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    assert_eq!(
        writes(&calls),
        vec![("PATCH".to_string(), SLICE.to_string())]
    );
    let addresses: Vec<&str> = the(&calls, "PATCH", SLICE).body["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["addresses"][0].as_str().unwrap())
        .collect();
    assert_eq!(addresses, vec!["10.1.0.7", "10.1.0.12"]);
}

#[tokio::test]
async fn image_pull_failure_lands_on_the_active_condition() {
    let mut h = harness();
    let mut f = hello();
    f.spec.template.as_mut().unwrap().0["spec"]["containers"][0]["image"] = json!("nope:1");
    h.store_function(&f);
    h.reconcile(&f).await.unwrap();
    let f = h.sync_caches(&f);
    h.api.take_calls();

    // Woken to 1; the kubelet cannot pull the image.
    let mut d: Deployment = h.api.object(DEPLOYMENT).unwrap();
    d.spec.as_mut().unwrap().replicas = Some(1);
    put(&mut h.caches.deployments, d);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "hello-6c9-x", "namespace": "default",
                     "labels": {FUNCTION_LABEL: "hello"}},
        "status": {"containerStatuses": [{
            "name": "app", "image": "nope:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff",
                                   "message": "Back-off pulling image \"nope:1\""}}}]}
    }))
    .unwrap();
    put(&mut h.caches.pods, pod);

    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    let status = the(&calls, "PATCH", STATUS);
    let active = condition(status, "Active");
    assert_eq!(active["status"], "False");
    assert_eq!(active["reason"], "ImagePullFailure");
    assert!(
        active["message"]
            .as_str()
            .unwrap()
            .contains("Back-off pulling image \"nope:1\""),
        "the activator shows clients this message"
    );
    assert_eq!(active["observedGeneration"], 1);
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert!(events(&calls).contains(&("Warning".into(), "ImagePullFailure".into())));
    // Nothing but the status changed.
    assert_eq!(
        writes(&calls).iter().filter(|(m, _)| m == "PATCH").count(),
        1
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_nothing_is_applied() {
    let mut h = harness();
    let mut f = hello();
    f.spec.scale.as_mut().unwrap().min = Some(5);
    f.spec.scale.as_mut().unwrap().max = Some(2);
    h.store_function(&f);
    let action = h
        .reconcile(&f)
        .await
        .expect("an invalid spec is not a reconcile error");
    assert_ne!(action, Action::await_change());
    let calls = h.api.take_calls();
    for path in [DEPLOYMENT, PRIVATE, PUBLIC, SLICE] {
        assert!(
            !calls.iter().any(|c| c.method == "PATCH" && c.path == path),
            "applied {path} for an invalid spec"
        );
    }
    let ready = condition(the(&calls, "PATCH", STATUS), "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.scale.min")
    );
    assert!(events(&calls).contains(&("Warning".into(), "InvalidSpec".into())));
}

#[tokio::test]
async fn a_template_the_api_server_refuses_is_an_invalid_spec() {
    let mut h = harness();
    let f = hello();
    h.store_function(&f);
    h.api.failures.lock().unwrap().insert(
        ("PATCH".into(), DEPLOYMENT.into()),
        (
            422,
            "Deployment.apps \"hello\" is invalid: spec.template.spec.containers[0].image: Required value"
                .into(),
        ),
    );
    h.reconcile(&f)
        .await
        .expect("reported on the status, not retried hot");
    let calls = h.api.take_calls();
    let status = the(&calls, "PATCH", STATUS);
    let ready = condition(status, "Ready");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("containers[0].image")
    );
    let active = condition(status, "Active");
    assert_eq!(
        active["reason"], "InvalidTemplate",
        "the activator fails fast on it"
    );
}

#[tokio::test]
async fn a_conflict_is_retried_soon_and_then_succeeds() {
    let mut h = harness();
    let f = hello();
    h.store_function(&f);
    h.api.failures.lock().unwrap().insert(
        ("PATCH".into(), DEPLOYMENT.into()),
        (409, "the object has been modified".into()),
    );
    let error = h
        .reconcile(&f)
        .await
        .expect_err("a conflict fails this attempt");
    assert!(matches!(error, Error::Conflict { .. }), "{error}");
    assert_eq!(error.metric_label(), "conflict");
    let action = reconcile::error_policy(Arc::new(f.clone()), &error, h.context.clone());
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(1)));
    h.api.take_calls();

    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    the(&calls, "PATCH", DEPLOYMENT);
    assert_eq!(
        condition(the(&calls, "PATCH", STATUS), "Ready")["status"],
        "True"
    );
}

#[tokio::test]
async fn someone_elses_object_is_never_taken_over() {
    let mut h = harness();
    let f = hello();
    h.store_function(&f);
    // A Service named like the Function that zeroscale did not create.
    h.api.objects.lock().unwrap().insert(
        PUBLIC.into(),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "hello", "namespace": "default", "uid": "x"},
               "spec": {"selector": {"app": "legacy"}, "ports": [{"port": 80}]}}),
    );
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.method == "PATCH" && !c.path.ends_with("/status")),
        "nothing applied: {:#?}",
        writes(&calls)
    );
    let ready = condition(the(&calls, "PATCH", STATUS), "Ready");
    assert_eq!(ready["reason"], "AlreadyExists");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("Service default/hello")
    );
}

#[tokio::test]
async fn a_deleted_function_is_left_to_the_garbage_collector() {
    let h = harness();
    let mut f = hello();
    f.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::now(),
    ));
    h.reconcile(&f).await.unwrap();
    assert!(h.api.take_calls().is_empty());
}

#[tokio::test]
async fn host_conflicts_name_the_host_and_its_owner() {
    let mut h = harness();
    let ts = |s| {
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::from_second(s).unwrap(),
        ))
    };
    let mut old = hello();
    old.metadata.name = Some("old".into());
    old.metadata.namespace = Some("team-a".into());
    old.metadata.uid = Some("other".into());
    old.metadata.creation_timestamp = ts(1_600_000_000);
    old.spec.hosts = vec!["api.example.com".into()];
    put(&mut h.caches.functions, old);
    let mut f = hello();
    f.metadata.creation_timestamp = ts(1_700_000_000);
    f.spec.hosts = vec!["api.example.com".into()];
    h.store_function(&f);
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    let ready = condition(the(&calls, "PATCH", STATUS), "Ready");
    assert_eq!(ready["reason"], "HostConflict");
    let message = ready["message"].as_str().unwrap();
    assert!(message.contains("api.example.com") && message.contains("team-a/old"));
    // Still reconciled: its own names keep working.
    the(&calls, "PATCH", DEPLOYMENT);
}

#[tokio::test]
async fn metrics_count_reconciles_and_errors_by_reason() {
    let h = harness();
    let mut f = hello();
    f.metadata.uid = Some(UID.into());
    h.api.failures.lock().unwrap().insert(
        ("PATCH".into(), DEPLOYMENT.into()),
        (409, "modified".into()),
    );
    let _ = h.reconcile(&f).await;
    assert_eq!(h.context.metrics.reconciles.get(), 1);
    assert_eq!(
        h.context
            .metrics
            .reconcile_errors
            .with_label_values(&["conflict"])
            .get(),
        1
    );
}

#[tokio::test]
async fn repeated_failures_back_off_up_to_five_minutes() {
    let h = harness();
    let f = Arc::new(hello());
    let error = Error::Status(kube::Error::Service("connection refused".into()));
    let action = reconcile::error_policy(f, &error, h.context.clone());
    assert_ne!(action, Action::await_change(), "a failure must be retried");
    for n in 1..=10 {
        let d = reconcile::backoff(n);
        let base = (5u64 << (n - 1).min(6)).min(300);
        assert!(
            d >= std::time::Duration::from_secs(base)
                && d <= std::time::Duration::from_secs_f64(base as f64 * 1.2),
            "retry {n}: {d:?}"
        );
    }
}
