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

#[tokio::test]
async fn the_controller_reconciles_a_stored_function_and_stops_cleanly() {
    let api = Arc::new(FakeApi::default());
    seed(&api);
    let client = client(api.clone());
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_controller(
        client,
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
