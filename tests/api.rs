//! The Function API as a user meets it: example manifests decode, defaults fill what is
//! left out, and each validation rule refuses a bad manifest with a message naming the
//! field (and accepts a good one).

use std::time::Duration;

use zeroscale::api::config::{Defaults, FunctionConfig, Metric, ValidationErrors};
use zeroscale::api::{Function, FunctionSpec};

fn parse(yaml: &str) -> Function {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("decoding {yaml}: {e}"))
}

fn resolve(f: &Function) -> Result<FunctionConfig, ValidationErrors> {
    FunctionConfig::resolve(&f.spec, &Defaults::default())
}

/// A minimal valid manifest with `extra` spliced into its spec.
fn manifest(extra: &str) -> String {
    let extra: String = extra.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {{name: f, namespace: default}}\nspec:\n  template:\n    spec:\n      containers: [{{name: app, image: busybox, ports: [{{containerPort: 9000}}]}}]\n{extra}"
    )
}

#[test]
fn every_example_decodes_validates_and_round_trips() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc).unwrap();
            if value.get("kind").and_then(|k| k.as_str()) != Some("Function") {
                continue;
            }
            let f: Function = serde_json::from_value(value.clone()).unwrap();
            resolve(&f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Round trip: serialising gives back what was written, nothing added.
            let again = serde_json::to_value(&f).unwrap();
            assert_eq!(
                strip_nulls(again),
                value,
                "{} does not round-trip",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected at least the hello and slow examples");
}

use serde::Deserialize;

fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => m
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, strip_nulls(v)))
            .collect(),
        other => other,
    }
}

#[test]
fn defaults_fill_what_is_omitted() {
    let c = resolve(&parse(&manifest(""))).unwrap();
    assert_eq!(c.port, 9000, "port defaults to the first containerPort");
    assert_eq!((c.scale.min, c.scale.max, c.scale.initial), (0, 10, 1));
    assert_eq!(c.scale.metric, Metric::Concurrency);
    assert_eq!(c.scale.target, 10.0);
    assert_eq!(c.scale.utilization, 0.7);
    assert_eq!(c.scale.container_concurrency, None);
    assert_eq!(c.scale.window, Duration::from_secs(60));
    assert_eq!(c.scale.panic_window, Duration::from_secs(6));
    assert_eq!(c.scale.panic_threshold, 2.0);
    assert_eq!(c.scale.idle_timeout, Duration::from_secs(30));
    assert_eq!(c.scale.scale_down_delay, Duration::ZERO);
    assert_eq!(c.timeouts.activation, Duration::from_secs(120));
    assert_eq!(c.timeouts.request, Duration::from_secs(300));
    assert_eq!(c.queue_capacity, 1000);

    let no_ports = parse(
        "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {name: f}\nspec:\n  template: {spec: {containers: [{name: app}]}}\n",
    );
    assert_eq!(resolve(&no_ports).unwrap().port, 8080);
    assert_eq!(no_ports.key().namespace, "default");
    // rps has its own default target; min lifts the default initial.
    let c = resolve(&parse(&manifest("scale: {metric: rps, min: 3}"))).unwrap();
    assert_eq!(
        (c.scale.metric, c.scale.target, c.scale.initial),
        (Metric::Rps, 100.0, 3)
    );
}

#[test]
fn cluster_defaults_apply_under_the_spec() {
    let defaults =
        Defaults::from_yaml("scale: {idleTimeout: 5m, max: 50}\nqueue: {capacity: 10}\n").unwrap();
    let f = parse(&manifest("scale: {max: 4}"));
    let c = FunctionConfig::resolve(&f.spec, &defaults).unwrap();
    assert_eq!(
        c.scale.idle_timeout,
        Duration::from_secs(300),
        "cluster default used"
    );
    assert_eq!(c.scale.max, 4, "the spec wins over the cluster default");
    assert_eq!(c.queue_capacity, 10);
    let typo = Defaults::from_yaml("scale: {idleTimout: 5m}").unwrap_err();
    assert!(typo.contains("scale.idleTimout"), "typos are named: {typo}");
}

#[test]
fn each_rule_accepts_good_and_refuses_bad_naming_the_field() {
    // (field the error must name, a passing spec fragment, a failing one)
    let cases: &[(&str, &str, &str)] = &[
        ("spec.port", "port: 65535", "port: 70000"),
        ("spec.port", "port: 1", "port: 0"),
        ("spec.scale.min", "scale: {min: 0}", "scale: {min: -1}"),
        ("spec.scale.max", "scale: {max: 1}", "scale: {max: 0}"),
        (
            "spec.scale.min",
            "scale: {min: 2, max: 2}",
            "scale: {min: 3, max: 2}",
        ),
        (
            "spec.scale.initial",
            "scale: {initial: 2, max: 2}",
            "scale: {initial: 3, max: 2}",
        ),
        (
            "spec.scale.initial",
            "scale: {min: 2, initial: 2}",
            "scale: {min: 2, initial: 1}",
        ),
        (
            "spec.scale.initial",
            "scale: {initial: 1}",
            "scale: {initial: 0}",
        ),
        (
            "spec.scale.target",
            "scale: {target: 1}",
            "scale: {target: 0}",
        ),
        (
            "spec.scale.utilization",
            "scale: {utilization: 100}",
            "scale: {utilization: 101}",
        ),
        (
            "spec.scale.utilization",
            "scale: {utilization: 1}",
            "scale: {utilization: 0}",
        ),
        (
            "spec.scale.containerConcurrency",
            "scale: {containerConcurrency: 0}",
            "scale: {containerConcurrency: -1}",
        ),
        (
            "spec.scale.window",
            "scale: {window: 6s}",
            "scale: {window: 5s}",
        ),
        (
            "spec.scale.window",
            "scale: {window: 1m30s}",
            "scale: {window: soon}",
        ),
        (
            "spec.scale.panicWindowPercent",
            "scale: {panicWindowPercent: 100}",
            "scale: {panicWindowPercent: 0}",
        ),
        (
            "spec.scale.panicThresholdPercent",
            "scale: {panicThresholdPercent: 110}",
            "scale: {panicThresholdPercent: 100}",
        ),
        (
            "spec.scale.idleTimeout",
            "scale: {idleTimeout: 1s}",
            "scale: {idleTimeout: 500ms}",
        ),
        (
            "spec.scale.scaleDownDelay",
            "scale: {scaleDownDelay: 0s}",
            "scale: {scaleDownDelay: 2h}",
        ),
        (
            "spec.scale.maxScaleUpRate",
            "scale: {maxScaleUpRate: 1.1}",
            "scale: {maxScaleUpRate: 1.0}",
        ),
        (
            "spec.scale.maxScaleDownRate",
            "scale: {maxScaleDownRate: 2}",
            "scale: {maxScaleDownRate: 0.5}",
        ),
        (
            "spec.timeouts.activation",
            "timeouts: {activation: 1s}",
            "timeouts: {activation: 0s}",
        ),
        (
            "spec.timeouts.request",
            "timeouts: {request: 10m}",
            "timeouts: {request: 10 minutes}",
        ),
        (
            "spec.queue.capacity",
            "queue: {capacity: 1}",
            "queue: {capacity: 0}",
        ),
        (
            "spec.hosts[0]",
            "hosts: [api.example.com]",
            "hosts: [Not_A_Host]",
        ),
        (
            "spec.hosts[0]",
            "hosts: [api.example.com]",
            "hosts: [localhost]",
        ),
        (
            "spec.hosts[0]",
            "hosts: [api.example.com]",
            "hosts: [db.prod.svc.cluster.local]",
        ),
        (
            "spec.hosts[1]",
            "hosts: [a.example.com, b.example.com]",
            "hosts: [a.example.com, a.example.com]",
        ),
    ];
    for (field, good, bad) in cases {
        let ok = resolve(&parse(&manifest(good)));
        assert!(ok.is_ok(), "{good:?} should pass: {ok:?}");
        let err = resolve(&parse(&manifest(bad))).expect_err(bad);
        assert!(
            err.mentions(field),
            "{bad:?}: error {err} should name {field}"
        );
        assert!(
            err.to_string().contains(field),
            "message names the field: {err}"
        );
    }
}

#[test]
fn template_problems_name_the_template() {
    let empty = parse(
        "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {name: f}\nspec:\n  template: {spec: {containers: []}}\n",
    );
    let err = resolve(&empty).unwrap_err();
    assert!(err.mentions("spec.template.spec.containers"), "{err}");

    // A template the typed decoder refuses is a problem of this Function only: the
    // Function itself still decodes (so a watch of all Functions keeps working).
    let garbled = parse(
        "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {name: f}\nspec:\n  template: {spec: {containers: [{name: app, ports: [{containerPort: lots}]}]}}\n",
    );
    let err = resolve(&garbled).unwrap_err();
    assert!(err.mentions("spec.template"), "{err}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let f = parse(&manifest(
        "port: 0\nscale: {min: 5, max: 2, utilization: 0}\nqueue: {capacity: 0}",
    ));
    let err = resolve(&f).unwrap_err();
    for field in [
        "spec.port",
        "spec.scale.min",
        "spec.scale.utilization",
        "spec.queue.capacity",
    ] {
        assert!(err.mentions(field), "{field} missing from {err}");
    }
}

#[test]
fn spec_written_back_has_no_defaults() {
    // GitOps: serialising a spec must not add fields the user did not write.
    let f = parse(&manifest(""));
    let spec: FunctionSpec = f.spec.clone();
    let v = serde_json::to_value(&spec).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["template"]);
}

/// A Function scaling an existing workload, with `extra` spliced into its spec.
fn target_manifest(spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {{name: f, namespace: default}}\nspec:\n{spec}"
    )
}

#[test]
fn a_function_can_scale_an_existing_deployment_or_stateful_set() {
    use zeroscale::api::TargetKind;
    use zeroscale::api::config::ScaleTarget;
    for (kind, want) in [
        ("Deployment", TargetKind::Deployment),
        ("StatefulSet", TargetKind::StatefulSet),
    ] {
        let f = parse(&target_manifest(&format!(
            "scaleTargetRef: {{apiVersion: apps/v1, kind: {kind}, name: web.v2}}\nport: 9000"
        )));
        let c = resolve(&f).unwrap();
        assert_eq!(
            c.target(),
            Some(&ScaleTarget {
                kind: want,
                name: "web.v2".into()
            })
        );
        assert!(c.template().is_none());
        assert_eq!(c.port, 9000);
        assert_eq!(f.scale_target(), Some((want, "web.v2")));
    }
    // apiVersion may be left out; nothing is added when written back (GitOps).
    let f = parse(&target_manifest(
        "scaleTargetRef: {kind: Deployment, name: web}\nport: 8080",
    ));
    assert!(resolve(&f).is_ok());
    let v = serde_json::to_value(&f.spec).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "port": 8080})
    );
}

/// Evaluates the CRD's CEL rules of the shape `[!]has(self.a) || [!]has(self.b)` on a
/// spec: enough for the rules on `spec`, so runtime and admission are compared on the
/// same manifests without an API server (the e2e suite compares with a real one).
fn cel_refusals(spec: &serde_json::Value) -> Vec<String> {
    let crd = serde_json::to_value(zeroscale::api::crd::function_crd()).unwrap();
    let rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .clone();
    let mut refused = Vec::new();
    for rule in rules {
        let text = rule["rule"].as_str().unwrap();
        let holds = text.split("||").any(|term| {
            let term = term.trim();
            let (negated, inner) = match term.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, term),
            };
            let field = inner
                .strip_prefix("has(self.")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("rule term {term:?} is not has(self.x)"));
            spec.get(field).is_some() != negated
        });
        if !holds {
            refused.push(rule["message"].as_str().unwrap().to_string());
        }
    }
    refused
}

#[test]
fn template_and_scale_target_ref_are_one_or_the_other_at_admission_and_at_runtime() {
    // (the field both must name, the spec)
    let cases: &[(&str, &str)] = &[
        ("spec.template", "port: 8080"),
        (
            "spec.scaleTargetRef",
            "template: {spec: {containers: [{name: app}]}}\nscaleTargetRef: {kind: Deployment, name: web}\nport: 8080",
        ),
        ("spec.port", "scaleTargetRef: {kind: Deployment, name: web}"),
    ];
    for (field, spec) in cases {
        let f = parse(&target_manifest(spec));
        let err = resolve(&f).expect_err(spec);
        assert!(
            err.mentions(field),
            "{spec:?}: runtime error {err} should name {field}"
        );
        let refused = cel_refusals(&serde_json::to_value(&f.spec).unwrap());
        assert!(
            refused.iter().any(|m| m.starts_with(&format!("{field} "))),
            "{spec:?}: the CRD should refuse it naming {field}, refused: {refused:?}"
        );
    }
    // What the runtime accepts, the CEL rules accept.
    for good in [
        "template: {spec: {containers: [{name: app}]}}",
        "scaleTargetRef: {kind: StatefulSet, name: db}\nport: 5432",
    ] {
        let f = parse(&target_manifest(good));
        assert!(resolve(&f).is_ok(), "{good}");
        assert_eq!(
            cel_refusals(&serde_json::to_value(&f.spec).unwrap()),
            Vec::<String>::new()
        );
    }
}

#[test]
fn scale_target_ref_fields_are_checked_as_the_schema_does() {
    let crd = serde_json::to_value(zeroscale::api::crd::function_crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["scaleTargetRef"]["properties"];
    let enum_of = |field: &str| -> Vec<String> {
        schema[field]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(enum_of("kind"), vec!["Deployment", "StatefulSet"]);
    assert_eq!(enum_of("apiVersion"), vec!["apps/v1"]);
    assert_eq!(schema["name"]["maxLength"], 253);
    // (field, a bad value the schema refuses: out of its enum, or off its pattern)
    for (field, bad) in [
        (
            "spec.scaleTargetRef.kind",
            "scaleTargetRef: {kind: DaemonSet, name: web}",
        ),
        (
            "spec.scaleTargetRef.apiVersion",
            "scaleTargetRef: {apiVersion: apps/v1beta1, kind: Deployment, name: web}",
        ),
        (
            "spec.scaleTargetRef.name",
            "scaleTargetRef: {kind: Deployment, name: Web_App}",
        ),
        (
            "spec.scaleTargetRef.name",
            "scaleTargetRef: {kind: Deployment, name: web-}",
        ),
    ] {
        let f = parse(&target_manifest(&format!("{bad}\nport: 8080")));
        let err = resolve(&f).expect_err(bad);
        assert!(err.mentions(field), "{bad}: {err} should name {field}");
        assert!(err.to_string().contains(field), "{err}");
    }
}

/// A watch lists every Function in one response: one the typed decoder refuses (here
/// written under a CRD version with other required fields) must not fail the list; it is
/// kept, named, and refused as invalid with the field that broke it.
#[test]
fn one_undecodable_function_does_not_fail_a_list_of_all() {
    let list = serde_json::json!({
        "apiVersion": "zeroscale.dev/v1alpha1",
        "kind": "FunctionList",
        "metadata": {"resourceVersion": "7"},
        "items": [
            {"apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
             "metadata": {"name": "good", "namespace": "default"},
             "spec": {"template": {"spec": {"containers": [{"name": "app", "command": ["x"]}]}}}},
            {"apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
             "metadata": {"name": "other-version", "namespace": "default"},
             "spec": {"scaleTargetRef": {"kind": "Deployment"}, "port": 8080}},
            {"apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
             "metadata": {"name": "wrong-type", "namespace": "default"},
             "spec": {"template": {"spec": {"containers": [{"name": "app"}]}},
                      "scale": {"min": "none"}}}
        ]
    });
    let list: kube::core::ObjectList<Function> =
        serde_json::from_value(list).expect("the list decodes whole");
    assert_eq!(list.items.len(), 3);
    assert!(list.items[0].spec.undecodable.is_none());
    for (f, field) in [
        (&list.items[1], "spec.scaleTargetRef.name"),
        (&list.items[2], "spec.scale.min"),
    ] {
        let err = resolve(f).expect_err("an undecodable spec is invalid");
        assert!(err.mentions(field), "{err}");
        assert!(err.to_string().contains("cannot be decoded"), "{err}");
    }
    // It is never written back: the field exists only in memory.
    let back = serde_json::to_value(&list.items[1]).unwrap();
    assert!(back["spec"].get("undecodable").is_none());
}
