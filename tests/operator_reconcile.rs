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
use kube::runtime::events::Reporter;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use operator_support::{Call, FakeApi, client};
use serde_json::{Value, json};
use tokio::sync::watch;
use zeroscale::api::{Defaults, FUNCTION_LABEL, Function};
use zeroscale::operator::Error;
use zeroscale::operator::build::{ActivatorEndpoint, ActivatorEndpoints};
use zeroscale::operator::cache::{Pack, PackedWriter, packed_store};
use zeroscale::operator::events::Events;
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
    deployments: PackedWriter<Deployment>,
    services: PackedWriter<Service>,
    slices: PackedWriter<EndpointSlice>,
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

fn listed_packed<K: Pack>() -> PackedWriter<K> {
    let (_, mut w) = packed_store();
    w.apply_watcher_event(&watcher::Event::Init);
    w.apply_watcher_event(&watcher::Event::InitDone);
    w
}

impl Default for Caches {
    fn default() -> Self {
        Self {
            functions: listed(),
            deployments: listed_packed(),
            services: listed_packed(),
            slices: listed_packed(),
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

/// An owned object into its (packed) cache.
fn put_owned<K: Pack + 'static>(w: &mut PackedWriter<K>, object: K) {
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
        events: Events::new(
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
            put_owned(&mut self.caches.deployments, d);
        }
        for path in [PRIVATE, PUBLIC] {
            if let Some(s) = self.api.object::<Service>(path) {
                put_owned(&mut self.caches.services, s);
            }
        }
        if let Some(s) = self.api.object::<EndpointSlice>(SLICE) {
            put_owned(&mut self.caches.slices, s);
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
    put_owned(&mut h.caches.deployments, d.clone());
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
    let template = f.spec.template.as_mut().unwrap();
    let mut value = template.value();
    value["spec"]["containers"][0]["image"] = json!("nope:1");
    *template = zeroscale::api::PodTemplate::from_value(value);
    h.store_function(&f);
    h.reconcile(&f).await.unwrap();
    let f = h.sync_caches(&f);
    h.api.take_calls();

    // Woken to 1; the kubelet cannot pull the image.
    let mut d: Deployment = h.api.object(DEPLOYMENT).unwrap();
    d.spec.as_mut().unwrap().replicas = Some(1);
    put_owned(&mut h.caches.deployments, d);
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

// --- Functions with a scaleTargetRef (examples/existing-deployment.yaml's web-lazy)

const WEB: &str = "/apis/apps/v1/namespaces/default/deployments/web";

fn function_path(name: &str) -> String {
    format!("/apis/zeroscale.dev/v1alpha1/namespaces/default/functions/{name}")
}

fn private_path(name: &str) -> String {
    format!("/api/v1/namespaces/default/services/{name}-private")
}

/// The example's Function pointing at Deployment `web`, named `name`, created at `created`.
fn lazy(name: &str, created: i64) -> Function {
    use serde::Deserialize;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/existing-deployment.yaml"
    ))
    .unwrap();
    let doc = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "Function")
        .unwrap();
    let mut f: Function = serde_json::from_value(doc).unwrap();
    f.metadata.name = Some(name.into());
    f.metadata.uid = Some(format!("uid-of-{name}"));
    f.metadata.generation = Some(1);
    f.metadata.resource_version = Some("1".into());
    f.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::from_second(created).unwrap(),
    ));
    f
}

/// The user's Deployment `web`, as the API server holds it.
fn web(replicas: i32, selector: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "web", "namespace": "default", "uid": "web-uid",
                        "resourceVersion": "100"},
           "spec": {"replicas": replicas, "selector": selector,
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [{"name": "web", "image": "web:1"}]}}},
           "status": {"replicas": 0, "readyReplicas": 0}})
}

impl Harness {
    fn put_object(&self, path: &str, object: Value) {
        self.api
            .objects
            .lock()
            .unwrap()
            .insert(path.to_string(), object);
    }

    /// Stores a Function in the fake API and in the caches and index the Function watch
    /// would fill.
    fn add_function(&mut self, f: &Function) {
        let name = f.metadata.name.clone().unwrap();
        self.put_object(&function_path(&name), serde_json::to_value(f).unwrap());
        put(&mut self.caches.functions, f.clone());
        self.context
            .targets
            .handle(&watcher::Event::Apply(f.clone()));
    }

    /// Copies what the fake API holds into the caches (what the watches would do) and
    /// returns the Function as stored (status, finalizers).
    fn sync(&mut self, f: &Function) -> Function {
        let objects = self.api.objects.lock().unwrap().clone();
        for (path, object) in &objects {
            if path.contains("/services/") {
                put_owned(
                    &mut self.caches.services,
                    serde_json::from_value(object.clone()).unwrap(),
                );
            } else if path.contains("/endpointslices/") {
                put_owned(
                    &mut self.caches.slices,
                    serde_json::from_value(object.clone()).unwrap(),
                );
            }
        }
        let name = f.metadata.name.clone().unwrap();
        let stored: Function =
            serde_json::from_value(objects[&function_path(&name)].clone()).unwrap();
        put(&mut self.caches.functions, stored.clone());
        self.context
            .targets
            .handle(&watcher::Event::Apply(stored.clone()));
        stored
    }

    fn replicas_of_web(&self) -> i64 {
        self.api.objects.lock().unwrap()[WEB]["spec"]["replicas"]
            .as_i64()
            .unwrap()
    }
}

fn scale_writes(calls: &[Call]) -> Vec<&Call> {
    calls
        .iter()
        .filter(|c| c.path.ends_with("/scale") && c.method != "GET")
        .collect()
}

fn finalizer_patches(calls: &[Call], name: &str) -> Vec<Value> {
    calls
        .iter()
        .filter(|c| c.method == "PATCH" && c.path == function_path(name))
        .map(|c| c.body.clone())
        .collect()
}

#[tokio::test]
async fn a_missing_target_is_reported_and_taken_once_it_exists() {
    let mut h = harness();
    let f = lazy("web-lazy", 1_700_000_000);
    h.add_function(&f);
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    let status = the(
        &calls,
        "PATCH",
        &format!("{}/status", function_path("web-lazy")),
    );
    let active = condition(status, "Active");
    assert_eq!(active["reason"], "TargetNotFound");
    assert!(
        active["message"]
            .as_str()
            .unwrap()
            .contains("Deployment web does not exist"),
        "{active}"
    );
    assert_eq!(condition(status, "Ready")["reason"], "TargetNotFound");
    assert!(status.body["status"].get("selector").is_none());
    // Routable (requests get the reason), but nothing is selected, scaled or held.
    let private = the(&calls, "PATCH", &private_path("web-lazy"));
    assert_eq!(
        private.body["spec"]["selector"],
        json!({FUNCTION_LABEL: "web-lazy"}),
        "no pod has the Function's own label"
    );
    the(
        &calls,
        "PATCH",
        "/api/v1/namespaces/default/services/web-lazy",
    );
    assert!(scale_writes(&calls).is_empty());
    assert!(finalizer_patches(&calls, "web-lazy").is_empty());
    assert!(
        !calls
            .iter()
            .any(|c| c.path.contains("/deployments") && c.is_write())
    );

    // The Deployment appears (its metadata watch event brings the Function here).
    h.put_object(WEB, web(2, json!({"matchLabels": {"app": "web"}})));
    let f = h.sync(&f);
    let action = h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    // The finalizer comes first: from then on, deleting the Function gives the
    // Deployment back.
    let fin = finalizer_patches(&calls, "web-lazy");
    assert_eq!(fin.len(), 1, "{fin:?}");
    assert_eq!(fin[0][1]["op"], "add");
    assert_eq!(fin[0][1]["value"], json!(["zeroscale.dev/scale-back"]));
    let at = |path: &str| calls.iter().position(|c| c.path == path && c.is_write());
    assert!(at(&function_path("web-lazy")) < at(&private_path("web-lazy")));
    let private = the(&calls, "PATCH", &private_path("web-lazy"));
    assert_eq!(private.body["spec"]["selector"], json!({"app": "web"}));
    let record: Value = serde_json::from_str(
        private.body["metadata"]["annotations"]["zeroscale.dev/scale-target"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record["originalReplicas"], 2);
    assert_eq!(record["uid"], "web-uid");
    let status = the(
        &calls,
        "PATCH",
        &format!("{}/status", function_path("web-lazy")),
    );
    assert_eq!(status.body["status"]["selector"], "app=web");
    assert_eq!(condition(status, "Active")["reason"], "Activating");
    // Replicas are asked for and not ready: the pods are read by the target's selector,
    // and read again soon (they have no watch).
    assert!(calls.iter().any(|c| c.method == "GET"
        && c.path == "/api/v1/namespaces/default/pods"
        && c.query.contains("labelSelector=app%3Dweb")));
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(5)));
    // zeroscale never writes the user's Deployment: not its spec, and the operator not
    // even its scale (the autoscaler and activators do, once the status says so).
    assert!(
        !calls
            .iter()
            .any(|c| c.path.starts_with(WEB) && c.is_write())
    );
}

#[tokio::test]
async fn a_target_selector_a_service_cannot_express_is_refused() {
    let mut h = harness();
    let f = lazy("web-lazy", 1_700_000_000);
    h.add_function(&f);
    h.put_object(
        WEB,
        web(
            1,
            json!({"matchLabels": {"app": "web"},
                   "matchExpressions": [{"key": "track", "operator": "NotIn", "values": ["canary"]}]}),
        ),
    );
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    let status = the(
        &calls,
        "PATCH",
        &format!("{}/status", function_path("web-lazy")),
    );
    let active = condition(status, "Active");
    assert_eq!(active["reason"], "TargetSelectorUnsupported");
    let message = active["message"].as_str().unwrap();
    assert!(
        message.contains("track NotIn [canary]") && message.contains("matchLabels"),
        "{message}"
    );
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert!(finalizer_patches(&calls, "web-lazy").is_empty());
    assert!(scale_writes(&calls).is_empty());
}

#[tokio::test]
async fn of_two_functions_naming_one_target_the_older_keeps_it() {
    let mut h = harness();
    h.put_object(WEB, web(3, json!({"matchLabels": {"app": "web"}})));
    let old = lazy("old", 1_600_000_000);
    let young = lazy("young", 1_700_000_000);
    h.add_function(&old);
    h.add_function(&young);
    h.reconcile(&old).await.unwrap();
    h.sync(&old);
    h.api.take_calls();
    h.reconcile(&young).await.unwrap();
    let calls = h.api.take_calls();
    let status = the(
        &calls,
        "PATCH",
        &format!("{}/status", function_path("young")),
    );
    let active = condition(status, "Active");
    assert_eq!(active["reason"], "TargetConflict");
    assert!(active["message"].as_str().unwrap().contains("default/old"));
    assert!(status.body["status"].get("selector").is_none());
    assert_eq!(
        the(&calls, "PATCH", &private_path("young")).body["spec"]["selector"],
        json!({FUNCTION_LABEL: "young"}),
        "the younger one routes to no pod"
    );
    assert!(finalizer_patches(&calls, "young").is_empty());
}

#[tokio::test]
async fn an_older_function_that_comes_later_takes_the_target_once_it_is_given_back() {
    let mut h = harness();
    h.put_object(WEB, web(3, json!({"matchLabels": {"app": "web"}})));
    let young = lazy("young", 1_700_000_000);
    h.add_function(&young);
    h.reconcile(&young).await.unwrap();
    let young = h.sync(&young);
    // The autoscaler scaled the idle target to zero.
    h.api.objects.lock().unwrap().get_mut(WEB).unwrap()["spec"]["replicas"] = json!(0);

    // An older Function is edited to name the same Deployment.
    let old = lazy("old", 1_600_000_000);
    h.add_function(&old);
    h.api.take_calls();
    h.reconcile(&old).await.unwrap();
    let calls = h.api.take_calls();
    let status = the(&calls, "PATCH", &format!("{}/status", function_path("old")));
    assert!(
        condition(status, "Active")["message"]
            .as_str()
            .unwrap()
            .contains("still held by Function default/young"),
        "it waits until the target is given back"
    );
    assert!(scale_writes(&calls).is_empty());

    // The younger one gives it back: the replicas it had before, then no record.
    h.reconcile(&young).await.unwrap();
    let calls = h.api.take_calls();
    let writes = scale_writes(&calls);
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].method, "PUT");
    assert_eq!(writes[0].body["spec"]["replicas"], 3);
    assert!(
        writes[0].body["metadata"]["resourceVersion"].is_string(),
        "optimistic concurrency"
    );
    assert!(writes[0].query.contains("fieldManager=zeroscale-operator"));
    assert_eq!(h.replicas_of_web(), 3);
    let private = the(&calls, "PATCH", &private_path("young"));
    assert!(
        private.body["metadata"]["annotations"]
            .get("zeroscale.dev/scale-target")
            .is_none()
    );
    assert_eq!(
        finalizer_patches(&calls, "young")[0][1]["op"],
        "remove",
        "nothing left to give back"
    );
    let young = h.sync(&young);
    assert!(young.metadata.finalizers.unwrap_or_default().is_empty());

    // Now the older one takes it, remembering the original 3.
    let old = h.sync(&old);
    h.reconcile(&old).await.unwrap();
    let calls = h.api.take_calls();
    let private = the(&calls, "PATCH", &private_path("old"));
    let record: Value = serde_json::from_str(
        private.body["metadata"]["annotations"]["zeroscale.dev/scale-target"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record["originalReplicas"], 3);
}

#[tokio::test]
async fn deleting_the_function_scales_the_target_back_then_lets_go() {
    let mut h = harness();
    h.put_object(WEB, web(2, json!({"matchLabels": {"app": "web"}})));
    let f = lazy("web-lazy", 1_700_000_000);
    h.add_function(&f);
    h.reconcile(&f).await.unwrap();
    let f = h.sync(&f);
    assert_eq!(
        f.metadata.finalizers.as_deref(),
        Some(&["zeroscale.dev/scale-back".to_string()][..])
    );
    // Idle: the autoscaler took it to zero.
    h.api.objects.lock().unwrap().get_mut(WEB).unwrap()["spec"]["replicas"] = json!(0);
    h.api.take_calls();

    // Deleted a while ago (the API server only sets the timestamp: the finalizer holds
    // it).
    let mut deleting = f.clone();
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now() - jiff::SignedDuration::from_secs(10),
        ));
    let action = h.reconcile(&deleting).await.unwrap();
    let calls = h.api.take_calls();
    let writes = scale_writes(&calls);
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].body["spec"]["replicas"], 2);
    assert_eq!(h.replicas_of_web(), 2, "what it had before the Function");
    assert!(events(&calls).contains(&("Normal".into(), "ScaledBack".into())));
    assert!(
        finalizer_patches(&calls, "web-lazy").is_empty(),
        "it checks once more before letting go"
    );
    assert_ne!(action, Action::await_change());

    // The count held: the finalizer goes, and the garbage collector does the rest.
    let action = h.reconcile(&deleting).await.unwrap();
    let calls = h.api.take_calls();
    assert!(scale_writes(&calls).is_empty());
    let fin = finalizer_patches(&calls, "web-lazy");
    assert_eq!(fin.len(), 1);
    assert_eq!(
        fin[0][1],
        json!({"op": "remove", "path": "/metadata/finalizers/0"})
    );
    assert_eq!(action, Action::await_change());
    assert!(
        !calls
            .iter()
            .any(|c| c.is_write() && c.path.contains("/services/web")),
        "nothing of the user's is touched, and the Function's own objects are the GC's"
    );
}

#[tokio::test]
async fn deleting_a_function_restores_a_target_it_just_took_after_a_settling_wait() {
    let mut h = harness();
    h.put_object(WEB, web(2, json!({"matchLabels": {"app": "web"}})));
    let f = lazy("web-lazy", 1_700_000_000);
    h.add_function(&f);
    h.reconcile(&f).await.unwrap();
    let mut deleting = h.sync(&f);
    h.api.take_calls();
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
    );
    // Nothing to restore, but an autoscaler that has not seen the deletion yet could
    // still scale it: the finalizer stays a moment.
    let action = h.reconcile(&deleting).await.unwrap();
    let calls = h.api.take_calls();
    assert!(scale_writes(&calls).is_empty());
    assert!(finalizer_patches(&calls, "web-lazy").is_empty());
    assert!(matches!(action, a if a != Action::await_change()));
}

#[tokio::test]
async fn replicas_set_by_another_field_manager_are_reported_once() {
    let mut h = harness();
    h.put_object(WEB, web(0, json!({"matchLabels": {"app": "web"}})));
    let f = lazy("web-lazy", 1_700_000_000);
    h.add_function(&f);
    h.reconcile(&f).await.unwrap();
    let f = h.sync(&f);
    h.api.take_calls();
    // A GitOps tool re-applies the manifest with replicas: 3.
    {
        let mut objects = h.api.objects.lock().unwrap();
        let d = objects.get_mut(WEB).unwrap();
        d["spec"]["replicas"] = json!(3);
        d["metadata"]["managedFields"] = json!([
            {"manager": "argocd-controller", "operation": "Apply", "apiVersion": "apps/v1",
             "time": (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(5)).to_string(),
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        ]);
    }
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    let fight: Vec<&Call> = calls
        .iter()
        .filter(|c| c.path.contains("/events") && c.body["reason"] == "ReplicasOverridden")
        .collect();
    assert_eq!(fight.len(), 1, "{:#?}", events(&calls));
    let note = fight[0].body["note"].as_str().unwrap();
    assert!(
        note.contains("argocd-controller") && note.contains("Deployment web"),
        "{note}"
    );
    assert_eq!(fight[0].body["type"], "Warning");
    // Seen already: not again at the next reconcile.
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.path.contains("/events") && c.body["reason"] == "ReplicasOverridden")
    );
}

#[tokio::test]
async fn a_targets_failing_pods_land_on_the_active_condition() {
    let mut h = harness();
    let mut deployment = web(1, json!({"matchLabels": {"app": "web"}}));
    deployment["status"] = json!({"replicas": 1, "readyReplicas": 0});
    h.put_object(WEB, deployment);
    h.put_object(
        "/api/v1/namespaces/default/pods/web-6c9-x",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web-6c9-x", "namespace": "default", "labels": {"app": "web"}},
               "status": {"containerStatuses": [{
                   "name": "web", "image": "web:1", "imageID": "", "ready": false,
                   "restartCount": 0,
                   "state": {"waiting": {"reason": "ImagePullBackOff",
                                          "message": "Back-off pulling image \"web:1\""}}}]}}),
    );
    let f = lazy("web-lazy", 1_700_000_000);
    h.add_function(&f);
    let action = h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    let status = the(
        &calls,
        "PATCH",
        &format!("{}/status", function_path("web-lazy")),
    );
    let active = condition(status, "Active");
    assert_eq!(active["reason"], "ImagePullFailure");
    assert!(active["message"].as_str().unwrap().contains("web-6c9-x"));
    assert_eq!(status.body["status"]["replicas"], 1);
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(5)));
}

#[tokio::test]
async fn a_function_edited_to_a_template_gives_its_target_back() {
    let mut h = harness();
    h.put_object(WEB, web(2, json!({"matchLabels": {"app": "web"}})));
    let f = lazy("web-lazy", 1_700_000_000);
    h.add_function(&f);
    h.reconcile(&f).await.unwrap();
    let mut f = h.sync(&f);
    h.api.objects.lock().unwrap().get_mut(WEB).unwrap()["spec"]["replicas"] = json!(0);
    h.api.take_calls();

    f.spec.scale_target_ref = None;
    f.spec.template = hello().spec.template;
    f.metadata.generation = Some(2);
    h.add_function(&f);
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    assert_eq!(h.replicas_of_web(), 2, "given back");
    let private = the(&calls, "PATCH", &private_path("web-lazy"));
    assert_eq!(
        private.body["spec"]["selector"],
        json!({FUNCTION_LABEL: "web-lazy"})
    );
    assert!(
        private.body["metadata"]["annotations"]
            .get("zeroscale.dev/scale-target")
            .is_none()
    );
    the(
        &calls,
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/web-lazy",
    );
    assert_eq!(finalizer_patches(&calls, "web-lazy")[0][1]["op"], "remove");
}

#[tokio::test]
async fn an_older_function_with_an_invalid_spec_does_not_keep_the_target() {
    let mut h = harness();
    h.put_object(WEB, web(1, json!({"matchLabels": {"app": "web"}})));
    let mut broken = lazy("broken", 1_600_000_000);
    broken.spec.scale.as_mut().unwrap().min = Some(9);
    h.add_function(&broken);
    let f = lazy("web-lazy", 1_700_000_000);
    h.add_function(&f);
    h.reconcile(&f).await.unwrap();
    let calls = h.api.take_calls();
    let status = the(
        &calls,
        "PATCH",
        &format!("{}/status", function_path("web-lazy")),
    );
    assert_eq!(status.body["status"]["selector"], "app=web");
}

#[tokio::test(start_paused = true)]
async fn a_repeated_event_joins_its_series_until_the_window_has_passed() {
    use kube::Resource;
    use kube::runtime::events::{Event, EventType};
    use zeroscale::operator::events::SERIES_WINDOW;

    let h = harness();
    let f = hello();
    let failed = |note: &str| Event {
        type_: EventType::Warning,
        reason: "Failed".into(),
        note: Some(note.into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let event = failed("the same thing again");
    let send = || async {
        let _ = h.context.events.publish(&event, &f.object_ref(&())).await;
        h.api
            .take_calls()
            .into_iter()
            .find(|c| c.path.contains("/events"))
            .expect("an Event call")
    };
    let created = send().await;
    assert_eq!(created.method, "POST", "a new Event");
    assert_eq!(created.body["reason"], "Failed");
    assert_eq!(created.body["type"], "Warning");
    assert_eq!(created.body["regarding"]["name"], "hello");
    let name = created.body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();

    let repeat = send().await;
    assert_eq!(repeat.method, "PATCH", "a repeat joins its series");
    assert!(
        repeat.path.ends_with(&format!("/events/{name}")),
        "{}",
        repeat.path
    );
    assert_eq!(repeat.body["series"]["count"], 2);

    // Another note is another Event (a note cannot change once created).
    let other = failed("something else");
    let _ = h.context.events.publish(&other, &f.object_ref(&())).await;
    let calls = h.api.take_calls();
    let call = calls.iter().find(|c| c.path.contains("/events")).unwrap();
    assert_eq!(call.method, "POST", "another note is a new Event");
    assert_eq!(call.body["note"], "something else");

    // Seen a minute ago: still the same series, even after a prune.
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    assert_eq!(h.context.events.prune(), 2);
    assert_eq!(send().await.body["series"]["count"], 3);

    // Gone from the API server (it keeps Events an hour): the repeat starts a new one.
    h.api.failures.lock().unwrap().insert(
        ("PATCH".into(), repeat.path.clone()),
        (404, "not found".into()),
    );
    let _ = h.context.events.publish(&event, &f.object_ref(&())).await;
    let methods: Vec<String> = h
        .api
        .take_calls()
        .into_iter()
        .filter(|c| c.path.contains("/events"))
        .map(|c| c.method)
        .collect();
    assert_eq!(methods, ["PATCH", "POST"]);

    // Nothing for the whole window: forgotten, so the memory is given back.
    tokio::time::advance(SERIES_WINDOW).await;
    assert_eq!(h.context.events.prune(), 0);
    assert_eq!(send().await.method, "POST", "a new Event object");
}
