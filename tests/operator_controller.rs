//! The controller as it runs in the operator (watches, caches, triggers, reconciles)
//! against the fake API server: from a stored Function and the activator's slices to
//! the owned objects and the status, and a clean stop.

mod operator_support;

use std::sync::Arc;
use std::time::Duration;

use operator_support::{FakeApi, client};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use zeroscale::api::Defaults;
use zeroscale::operator::metrics::Metrics;
use zeroscale::operator::reconcile::Settings;
use zeroscale::operator::{ControllerArgs, deployment_cache, run_controller};
use zeroscale::platform::kube::LIST_PAGE_SIZE;

const FUNCTION: &str = "/apis/zeroscale.dev/v1alpha1/namespaces/default/functions/hello";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/default/deployments/hello";
const SLICE: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/hello-activator";

fn seed(api: &FakeApi) {
    let mut objects = api.objects.lock().unwrap();
    objects.insert(
        FUNCTION.into(),
        json!({"apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
               "metadata": {"name": "hello", "namespace": "default", "uid": "u-1",
                            "generation": 1, "resourceVersion": "3"},
               "spec": {"template": {"spec": {"containers": [
                   {"name": "app", "image": "python:3.12-alpine",
                    "ports": [{"containerPort": 8080}]}]}}}}),
    );
    objects.insert(
        "/apis/discovery.k8s.io/v1/namespaces/zeroscale-system/endpointslices/zeroscale-activator-x"
            .into(),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "zeroscale-activator-x", "namespace": "zeroscale-system",
                            "labels": {"kubernetes.io/service-name": "zeroscale-activator"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": true}}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
    );
}

/// The controller, running against `api` until the token is cancelled.
fn start(api: &Arc<FakeApi>) -> (tokio::task::JoinHandle<()>, CancellationToken, Metrics) {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_controller(
        client(api.clone()),
        ControllerArgs {
            namespace: None,
            activator: ("zeroscale-system".into(), "zeroscale-activator".into()),
            settings: Settings {
                cluster_domain: "cluster.local".into(),
                defaults: Defaults::default(),
            },
            identity: "operator-test".into(),
            slice_writes_per_second: 100,
        },
        deployment_cache().1,
        metrics.clone(),
        stop.clone(),
    ));
    (task, stop, metrics)
}

#[tokio::test]
async fn the_controller_reconciles_a_stored_function_and_stops_cleanly() {
    let api = Arc::new(FakeApi::default());
    seed(&api);
    let (task, stop, metrics) = start(&api);

    api.until("the Function's objects and status", |api| {
        let objects = api.objects.lock().unwrap();
        objects.contains_key(DEPLOYMENT)
            && objects.contains_key(SLICE)
            && objects[FUNCTION]["status"]["conditions"].is_array()
    })
    .await;
    let slice: serde_json::Value = api.objects.lock().unwrap()[SLICE].clone();
    assert_eq!(slice["endpoints"][0]["addresses"][0], "10.1.0.7");
    let status = api.objects.lock().unwrap()[FUNCTION]["status"].clone();
    assert_eq!(status["url"], "http://hello.default.svc.cluster.local");
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(ready["status"], "True", "{ready}");
    assert!(metrics.reconciles.get() >= 1);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the controller stops on cancel")
        .unwrap();
}

/// The watches list in pages of `LIST_PAGE_SIZE` (one answer of 10,000 objects, decoded
/// whole, was a peak the allocator kept as resident memory), and following the pages
/// loses no Function.
#[tokio::test]
async fn the_caches_list_in_pages_and_every_function_is_reconciled() {
    let api = Arc::new(FakeApi::default());
    seed(&api);
    let n = 2 * LIST_PAGE_SIZE as usize + 50;
    {
        let mut objects = api.objects.lock().unwrap();
        let template = objects[FUNCTION].clone();
        for i in 0..n - 1 {
            let mut f = template.clone();
            let name = format!("fn-{i:03}");
            f["metadata"]["name"] = json!(name);
            f["metadata"]["uid"] = json!(format!("u-fn-{i}"));
            objects.insert(
                format!("/apis/zeroscale.dev/v1alpha1/namespaces/default/functions/{name}"),
                f,
            );
        }
    }
    let (task, stop, _) = start(&api);

    api.until("every Function's Deployment", |api| {
        let objects = api.objects.lock().unwrap();
        objects
            .keys()
            .filter(|k| k.starts_with("/apis/apps/v1/namespaces/default/deployments/"))
            .count()
            == n
    })
    .await;
    let calls = api.calls.lock().unwrap().clone();
    let function_lists: Vec<_> = calls
        .iter()
        .filter(|c| c.method == "GET" && c.path.ends_with("/functions"))
        .collect();
    let limit = format!("limit={LIST_PAGE_SIZE}");
    assert!(
        function_lists.len() >= 3 && function_lists.iter().all(|c| c.query.contains(&limit)),
        "{n} Functions are listed in pages of {LIST_PAGE_SIZE}: {:?}",
        function_lists.iter().map(|c| &c.query).collect::<Vec<_>>()
    );
    // Every list of the kinds there is one of per Function (not the activator's Service).
    for c in calls.iter().filter(|c| {
        c.method == "GET" && c.query.contains("limit=") && !c.path.contains("zeroscale-system")
    }) {
        assert!(
            c.query.contains(&limit),
            "every list is paged: {} {}",
            c.path,
            c.query
        );
    }

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the controller stops on cancel")
        .unwrap();
}
