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
use zeroscale::operator::cache;

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

/// A UUID of the shape the API server gives, different for each `seed` and as
/// incompressible as a random one.
fn uid(seed: u64) -> String {
    // splitmix64
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let hex = format!("{:016x}{:016x}", next(), next());
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Object `i` of a fixture, as a watch would deliver it: parsed from the API server's
/// JSON, with its own name, uid and resourceVersion, and owned by Function `i`.
fn object<K>(text: &str, i: usize) -> K
where
    K: DeserializeOwned + Resource,
{
    let mut k: K = serde_json::from_str(text).unwrap();
    let name = format!("{}-{i:05}", k.meta().name.clone().unwrap_or_default());
    let seed = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
    let m = k.meta_mut();
    m.name = Some(name);
    m.uid = Some(uid(seed));
    m.resource_version = Some(format!("{}", 1_000_000 + seed % 9_000_000));
    for owner in m.owner_references.iter_mut().flatten() {
        owner.uid = uid(i as u64);
    }
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
    let (_, mut deployments) = cache::packed_store::<Deployment>();
    let (_, mut services) = cache::packed_store::<Service>();
    let (_, mut slices) = cache::packed_store::<EndpointSlice>();
    let start = live_bytes();
    for i in 0..FUNCTIONS {
        let mut f: Function = object(&fx.function, i);
        cache::trim_function(&mut f);
        store(&mut functions, f);
        deployments.apply_watcher_event(&watcher::Event::Apply(object(&fx.deployment, i)));
        for text in [&fx.service, &fx.private_service] {
            services.apply_watcher_event(&watcher::Event::Apply(object(text, i)));
        }
        slices.apply_watcher_event(&watcher::Event::Apply(object(&fx.activator_slice, i)));
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
    // Deployment), and two activators: a heavier Function than most (4.0 KB measured
    // with the packed store, 6.9 KB in kube's store, 11.0 KB before the bodies were
    // compressed; 83 KB before any trimming, which is what issue 16 measured on a
    // cluster).
    assert!(
        after <= 5 * 1024,
        "{after} B per Function in the caches (before: {before} B)"
    );
    assert!(after * 6 <= before, "before {before} B, after {after} B");
}
