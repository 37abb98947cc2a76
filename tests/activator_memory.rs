//! What a registered Function costs the activator in memory: the routing table for
//! 10,000 Functions, measured with a counting allocator, stays within 2 KiB each.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use zeroscale::activator::{Activator, Settings};
use zeroscale::api::{Function, FunctionSpec};
use zeroscale::platform::memory::MemoryPlatform;

#[path = "support/counting.rs"]
mod counting;
use counting::live_bytes;

const FUNCTIONS: usize = 10_000;

fn function(i: usize) -> Function {
    let hosts: Vec<String> = if i.is_multiple_of(10) {
        vec![format!("fn-{i}.example.com")]
    } else {
        vec![]
    };
    let spec: FunctionSpec = serde_json::from_value(serde_json::json!({
        "template": {"spec": {"containers": [{
            "name": "app",
            "image": "registry.example.com/team/app:1.2.3",
            "ports": [{"containerPort": 8080}],
        }]}},
        "hosts": hosts,
        "scale": {"max": 5, "containerConcurrency": 10},
    }))
    .unwrap();
    let mut f = Function::new(&format!("function-{i:05}"), spec);
    f.metadata.namespace = Some(format!("team-{}", i % 50));
    f
}

#[tokio::test]
async fn ten_thousand_functions_cost_at_most_2_kib_each() {
    let platform = MemoryPlatform::new();
    for i in 0..FUNCTIONS {
        platform.apply_function(function(i));
    }
    let registry = prometheus::Registry::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();

    let before = live_bytes();
    let activator = Activator::new(platform.clone(), Settings::default(), &registry).unwrap();
    let task = tokio::spawn(activator.clone().run(listener, shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(60), activator.synced())
        .await
        .expect("synced");
    assert_eq!(activator.function_count(), FUNCTIONS);
    let after = live_bytes();

    let per_function = (after - before) as f64 / FUNCTIONS as f64;
    println!("activator memory per registered Function: {per_function:.0} bytes");
    assert!(
        per_function <= 2048.0,
        "{per_function:.0} bytes per Function"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
