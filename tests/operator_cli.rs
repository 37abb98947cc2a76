//! `zeroscale operator` as the Helm chart runs it: the flag names it relies on exist,
//! and a bad flag value fails at start-up with a message instead of later.

use std::process::Command;

fn zeroscale(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zeroscale"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent")
        .output()
        .expect("the binary runs")
}

#[test]
fn the_flags_the_chart_uses_exist() {
    let out = zeroscale(&["operator", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--namespace",
        "--activator-service",
        "--admin-listen",
        "--leader-elect",
        "--lease-name",
        "--lease-namespace",
        "--pod-name",
        "--cluster-domain",
        "--defaults",
    ] {
        assert!(help.contains(flag), "missing {flag} in:\n{help}");
    }
    for env in ["ZEROSCALE_NAMESPACE", "POD_NAMESPACE", "POD_NAME"] {
        assert!(help.contains(env), "missing env fallback {env}");
    }
}

#[test]
fn a_malformed_activator_service_fails_at_start_up() {
    let out = zeroscale(&["operator", "--activator-service", "no-namespace"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--activator-service must be namespace/name"),
        "{err}"
    );
}

#[test]
fn without_a_cluster_the_operator_exits_with_an_error() {
    let out = zeroscale(&["operator", "--leader-elect=false"]);
    assert!(!out.status.success(), "no kubeconfig, no in-cluster config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error"), "{err}");
}
