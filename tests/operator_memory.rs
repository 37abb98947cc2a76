//! What a Function costs the operator's watch caches, measured with a counting allocator
//! on objects exactly as a v1.24 API server sent them (tests/fixtures/cache, with their
//! managed fields): the caches as they were (every field, the Deployments twice, the
//! pod slices of the private Services too) against the trimmed, shared caches of
//! `operator::cache`. Issue 16's goal is 10 KB per Function for the whole operator; the
//! caches must leave room for the rest (the autoscaler's windows, the controller's queue).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use zeroscale::api::Function;
use zeroscale::operator::cache::{self, Packed};

#[path = "support/counting.rs"]
mod counting;
use counting::live_bytes;

const FUNCTIONS: usize = 2_000;

fn fixture<K: DeserializeOwned>(name: &str) -> String {
    let path = format!("{}/tests/fixtures/cache/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    // Parses, so a broken fixture fails here rather than in the measurement.
    let _: K = serde_json::from_str(&text).unwrap();
    text
}

/// Object `i` of a fixture, as a watch would deliver it: parsed from the API server's
/// JSON, with its own name.
fn object<K>(text: &str, i: usize) -> K
where
    K: DeserializeOwned + Resource,
{
    let mut k: K = serde_json::from_str(text).unwrap();
    let name = format!("{}-{i:05}", k.meta().name.clone().unwrap_or_default());
    k.meta_mut().name = Some(name);
    k
}

fn store<K>(writer: &mut Writer<K>, k: K)
where
    K: Resource<DynamicType = ()> + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Apply(k));
}

struct Fixtures {
    function: String,
    deployment: String,
    service: String,
    private_service: String,
    activator_slice: String,
    private_slice: String,
}

impl Fixtures {
    fn load() -> Self {
        Self {
            function: fixture::<Function>("function.json"),
            deployment: fixture::<Deployment>("deployment.json"),
            service: fixture::<Service>("service.json"),
            private_service: fixture::<Service>("service-private.json"),
            activator_slice: fixture::<EndpointSlice>("slice-activator.json"),
            private_slice: fixture::<EndpointSlice>("slice-private.json"),
        }
    }
}

/// Bytes per Function the operator's caches held before issue 16.
fn before(fx: &Fixtures) -> isize {
    let mut functions = Writer::<Function>::default();
    let mut deployments = Writer::<Deployment>::default();
    let mut autoscaler_deployments = Writer::<Deployment>::default();
    let mut services = Writer::<Service>::default();
    let mut slices = Writer::<EndpointSlice>::default();
    let start = live_bytes();
    for i in 0..FUNCTIONS {
        store(&mut functions, object(&fx.function, i));
        store(&mut deployments, object(&fx.deployment, i));
        store(&mut autoscaler_deployments, object(&fx.deployment, i));
        for text in [&fx.service, &fx.private_service] {
            let mut s: Service = object(text, i);
            s.metadata.managed_fields = None;
            store(&mut services, s);
        }
        for text in [&fx.activator_slice, &fx.private_slice] {
            let mut s: EndpointSlice = object(text, i);
            s.metadata.managed_fields = None;
            store(&mut slices, s);
        }
    }
    let bytes = live_bytes() - start;
    drop((
        functions,
        deployments,
        autoscaler_deployments,
        services,
        slices,
    ));
    bytes / FUNCTIONS as isize
}

/// Bytes per Function the trimmed, packed, shared caches hold.
fn after(fx: &Fixtures) -> isize {
    let mut functions = Writer::<Function>::default();
    let mut deployments = Writer::<Packed<Deployment>>::default();
    let mut services = Writer::<Packed<Service>>::default();
    let mut slices = Writer::<Packed<EndpointSlice>>::default();
    let start = live_bytes();
    for i in 0..FUNCTIONS {
        let mut f: Function = object(&fx.function, i);
        cache::trim_function(&mut f);
        store(&mut functions, f);
        store(
            &mut deployments,
            Packed::pack(object::<Deployment>(&fx.deployment, i)),
        );
        for text in [&fx.service, &fx.private_service] {
            store(&mut services, Packed::pack(object::<Service>(text, i)));
        }
        store(
            &mut slices,
            Packed::pack(object::<EndpointSlice>(&fx.activator_slice, i)),
        );
    }
    let bytes = live_bytes() - start;
    drop((functions, deployments, services, slices));
    bytes / FUNCTIONS as isize
}

#[test]
fn the_operator_caches_hold_a_fraction_of_what_the_api_server_sends() {
    let fx = Fixtures::load();
    let before = before(&fx);
    let after = after(&fx);
    println!("operator caches per Function: before {before} B, after {after} B");
    // The fixtures carry a 900-byte script in the pod template, twice (Function and
    // Deployment), and two activators: a heavier Function than most (6.8 KB measured
    // with the bodies compressed, 11.0 KB before that; 83 KB before any trimming, which
    // is what issue 16 measured on a cluster).
    assert!(
        after <= 8 * 1024,
        "{after} B per Function in the caches (before: {before} B)"
    );
    assert!(after * 6 <= before, "before {before} B, after {after} B");
}
