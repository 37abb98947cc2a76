"""The Helm chart: it lints, its schema refuses mistakes, and it renders what users rely
on, with the default values and with every option moved. The objects' shapes (every
field a real Kubernetes field) and the RBAC against the code's API calls are checked by
tests/packaging.rs."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT, VALUES, find, one, render

CHART = ROOT / "charts" / "zeroscale"
REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


def values_of(path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.mark.parametrize("values_file", VALUES, ids=lambda p: p.stem)
def test_lints_strictly_on_the_oldest_supported_kubernetes(helm, values_file):
    report = helm.lint(CHART, values_of(values_file), strict=True, kube_version="v1.24.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    # Only an "icon is recommended" info is tolerated.
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values_file", VALUES, ids=lambda p: p.stem)
def test_renders_labelled_namespaced_objects(render_values, values_file):
    docs = render_values(values_of(values_file))
    assert docs
    for doc in docs:
        meta = doc["metadata"]
        assert doc.get("apiVersion") and doc.get("kind") and meta.get("name"), doc
        if doc["kind"] == "CustomResourceDefinition":
            continue
        labels = meta.get("labels", {})
        for key in REQUIRED_LABELS:
            assert key in labels, f"{doc['kind']} {meta['name']} lacks label {key}"
        if doc["kind"] in {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget",
                           "HorizontalPodAutoscaler", "ServiceMonitor", "RoleBinding", "Role"}:
            assert meta.get("namespace"), f"{doc['kind']} {meta['name']} has no namespace"


@pytest.mark.parametrize(
    "bad, complaint",
    [
        ({"replicaCount": 3}, "additional properties"),
        ({"logging": {"format": "xml"}}, "text"),
        ({"operator": {"replicas": 0}}, "minimum"),
        ({"activator": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}}, "maximum"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "pattern"),
        # The components watch one namespace or all of them, not a list.
        ({"watchNamespaces": ["team-a", "team-b"]}, "maxItems|at most|1"),
        ({"defaults": {"scale": {"idleTimout": "5m"}}}, "idleTimout"),
        ({"defaults": {"scale": {"metric": "latency"}}}, "concurrency"),
        ({"defaults": {"scale": {"idleTimeout": "5 minutes"}}}, "pattern"),
        ({"defaults": {"queue": {"capacity": 0}}}, "minimum"),
        ({"image": {"pullPolicy": "Sometimes"}}, "IfNotPresent"),
        ({"image": {"digest": "latest"}}, "pattern"),
        ({"activator": {"trustedProxies": ["10.0.0.1"]}}, "pattern"),
    ],
)
def test_schema_refuses_mistakes(helm, bad, complaint):
    with pytest.raises(helm.HelmValuesError, match=complaint):
        with helm.Chart.load(CHART) as chart:
            chart.validate_schema(bad)


def test_every_values_key_is_in_the_schema(helm):
    """values.yaml and the schema describe the same tree (the schema is strict, so a key
    added to values.yaml without the schema would make the defaults themselves invalid)."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.values)


def test_defaults_install_the_components(default_docs):
    operator = one(default_docs, "Deployment", "zeroscale-operator")
    activator = one(default_docs, "Deployment", "zeroscale-activator")
    assert operator["spec"]["replicas"] == 2
    assert activator["spec"]["replicas"] >= 2
    for deploy in (operator, activator):
        pod = deploy["spec"]["template"]
        assert SELECTOR_KEYS <= set(deploy["spec"]["selector"]["matchLabels"])
        for key, value in deploy["spec"]["selector"]["matchLabels"].items():
            assert pod["metadata"]["labels"][key] == value
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "ghcr.io/zeroscale/zeroscale:0.1.0", "tag defaults to appVersion"
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert "--defaults=/etc/zeroscale/defaults.yaml" in container["args"]
        assert not any(a.startswith("--namespace") for a in container["args"]), "all namespaces by default"
        assert "checksum/defaults" in pod["metadata"]["annotations"], "a defaults change rolls the pods"
    # The drain fits in the grace period.
    assert activator["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30
    assert "--drain-timeout=30s" in activator["spec"]["template"]["spec"]["containers"][0]["args"]
    for name in ("zeroscale-operator", "zeroscale-activator"):
        pdb = one(default_docs, "PodDisruptionBudget", name)
        assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert not find(default_docs, "HorizontalPodAutoscaler")
    assert not find(default_docs, "ServiceMonitor")
    assert not find(default_docs, "NetworkPolicy"), "opt-in: a policy denies whatever it does not list"
    crd = one(default_docs, "CustomResourceDefinition", "functions.zeroscale.dev")
    assert crd["spec"]["group"] == "zeroscale.dev"


def test_activator_service_ports(default_docs):
    service = one(default_docs, "Service", "zeroscale-activator")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == 80 and ports["http"]["targetPort"] == "http"
    assert ports["admin"]["port"] == 9090 and ports["admin"]["targetPort"] == "admin"
    container = one(default_docs, "Deployment", "zeroscale-activator")["spec"]["template"]["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == {"http": 8080, "admin": 9090}


def test_scoped_install_grants_nothing_cluster_wide_to_components(render_values):
    docs = render_values({"watchNamespaces": ["team-a"], "rbac": {"aggregateToDefaultRoles": False}})
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    for component in ("operator", "activator"):
        roles = find(docs, "Role", f"zeroscale-{component}")
        assert [r["metadata"]["namespace"] for r in roles] == ["team-a"]
        bindings = find(docs, "RoleBinding", f"zeroscale-{component}")
        assert [b["metadata"]["namespace"] for b in bindings] == ["team-a"]
        for binding in bindings:
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": f"zeroscale-{component}", "namespace": "zeroscale-system"}
            ]
    own_role = one(docs, "Role", "zeroscale-operator-own-namespace")
    assert own_role["metadata"]["namespace"] == "zeroscale-system"
    operator = one(docs, "Deployment", "zeroscale-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=team-a" in operator["args"]



def test_hpa_takes_over_the_activator_replicas(render_values):
    docs = render_values({"activator": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9}}})
    hpa = one(docs, "HorizontalPodAutoscaler", "zeroscale-activator")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "zeroscale-activator",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    assert "replicas" not in one(docs, "Deployment", "zeroscale-activator")["spec"]


def test_hpa_refuses_min_above_max(helm):
    with pytest.raises(helm.HelmError, match="minReplicas"):
        render.render({"activator": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}})


def test_service_monitor_scrapes_both_admin_ports(render_values):
    docs = render_values({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    monitor = one(docs, "ServiceMonitor", "zeroscale")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    selector = monitor["spec"]["selector"]
    selected = [
        s for s in find(docs, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in selector["matchLabels"].items())
        and s["metadata"]["labels"]["app.kubernetes.io/component"] in selector["matchExpressions"][0]["values"]
    ]
    assert sorted(s["metadata"]["name"] for s in selected) == ["zeroscale-activator", "zeroscale-operator-metrics"]
    for service in selected:
        assert "admin" in {p["name"] for p in service["spec"]["ports"]}


def test_custom_defaults_and_json_logs_reach_both_components(render_values):
    defaults = {
        "scale": {"max": 20, "idleTimeout": "5m", "metric": "rps"},
        "timeouts": {"activation": "60s"},
        "queue": {"capacity": 10},
    }
    docs = render_values({"defaults": defaults, "logging": {"format": "json", "level": "debug"}})
    config = one(docs, "ConfigMap", "zeroscale-defaults")
    assert yaml.safe_load(config["data"]["defaults.yaml"]) == defaults
    default_checksum = None
    for name in ("zeroscale-operator", "zeroscale-activator"):
        pod = one(docs, "Deployment", name)["spec"]["template"]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["ZEROSCALE_LOG_FORMAT"] == "json" and env["RUST_LOG"] == "debug"
        mount = pod["spec"]["containers"][0]["volumeMounts"][0]
        assert mount["readOnly"] and mount["mountPath"] == "/etc/zeroscale"
        assert pod["spec"]["volumes"][0]["configMap"]["name"] == "zeroscale-defaults"
        default_checksum = default_checksum or pod["metadata"]["annotations"]["checksum/defaults"]
    plain = one(render.documents(render.render({})), "Deployment", "zeroscale-operator")
    assert plain["spec"]["template"]["metadata"]["annotations"]["checksum/defaults"] != default_checksum


def test_image_digest_wins_over_tag(render_values):
    digest = "sha256:" + "a" * 64
    docs = render_values({"image": {"repository": "r.example/zs", "tag": "1.2.3", "digest": digest}})
    images = {c["image"] for d in find(docs, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {f"r.example/zs@{digest}"}


def test_names_follow_the_release(render_values):
    docs = render_values({}, name="edge", namespace="ingress")
    assert one(docs, "Deployment", "edge-zeroscale-activator")["metadata"]["namespace"] == "ingress"
    operator = one(docs, "Deployment", "edge-zeroscale-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--activator-service=$(POD_NAMESPACE)/edge-zeroscale-activator" in operator["args"]
    assert "--lease-name=edge-zeroscale-operator" in operator["args"]


def test_notes_tell_how_to_call_a_function(helm):
    with helm.Chart.load(CHART) as chart:
        notes = chart.render({}, name="zeroscale", namespace="zeroscale-system")["zeroscale/templates/NOTES.txt"]
    assert "kind: Function" in notes
    assert "curl" in notes and "hello.default" in notes
    assert "port-forward svc/zeroscale-activator 8080:80" in notes


def test_chart_crd_is_the_generated_one():
    generated = (ROOT / "crds" / "function.yaml").read_text()
    assert (CHART / "crds" / "function.yaml").read_text() == generated, (
        "charts/zeroscale/crds/function.yaml is stale: cp crds/function.yaml charts/zeroscale/crds/"
    )


def test_network_policy_keeps_the_activator_open_to_every_namespace(render_values):
    docs = render_values({"networkPolicy": {"enabled": True}})
    activator = one(docs, "NetworkPolicy", "zeroscale-activator")
    traffic = [r for r in activator["spec"]["ingress"] if {"port": "http", "protocol": "TCP"} in r["ports"]]
    assert traffic and all("from" not in r for r in traffic), "the http port admits every source"
    admin = [r for r in activator["spec"]["ingress"] if {"port": "admin", "protocol": "TCP"} in r["ports"]]
    (rule,) = admin
    operator_labels = one(docs, "Deployment", "zeroscale-operator")["spec"]["template"]["metadata"]["labels"]
    peers = rule["from"]
    pod_selectors = [p.get("podSelector", {}).get("matchLabels", {}) for p in peers]
    assert any(s and s.items() <= operator_labels.items() for s in pod_selectors), "the operator reads /stats"
    assert not any("namespaceSelector" in p for p in peers), "no metrics namespaces were named"
    # Nothing may call the operator unless a metrics namespace is named.
    assert one(docs, "NetworkPolicy", "zeroscale-operator")["spec"]["ingress"] == []


def test_extra_args_come_last(render_values):
    docs = render_values({"activator": {"extraArgs": ["--header-read-timeout=5s"]}})
    args = one(docs, "Deployment", "zeroscale-activator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-1] == "--header-read-timeout=5s"


@pytest.mark.parametrize(
    ("values", "lame_duck", "limit"),
    [
        ({}, 300, 500),  # 10,000 Functions at 50 rewrites/s: 200 s, times 1.5 and 2.5
        ({"functions": 20000, "operator": {"sliceWritesPerSecond": 100}}, 300, 500),
        ({"functions": 50000}, 1500, 2500),
        ({"functions": 100}, 30, 50),  # never under 30 s
        ({"functions": 50000, "activator": {"lameDuckTimeoutSeconds": 45}}, 45, 75),  # set: kept
        ({"activator": {"lameDuckLimitSeconds": 400}}, 300, 400),
        ({"activator": {"lameDuckLimitSeconds": 10}}, 300, 300),  # never under the timeout
    ],
)
def test_the_lame_duck_time_is_computed_from_the_functions_and_the_write_rate(render_values, values, lame_duck, limit):
    """An activator pod change is one slice rewrite per Function at the operator's pace: a
    stopping activator must be allowed to serve that long (longer while the operator is
    seen to work), and the kubelet to wait for it and its drain."""
    docs = render_values(values)
    activator = one(docs, "Deployment", "zeroscale-activator")["spec"]["template"]["spec"]
    operator = one(docs, "Deployment", "zeroscale-operator")["spec"]["template"]["spec"]
    rate = values.get("operator", {}).get("sliceWritesPerSecond", 50)
    assert f"--slice-writes-per-second={rate}" in operator["containers"][0]["args"]
    assert f"--lame-duck-timeout={lame_duck}s" in activator["containers"][0]["args"]
    assert f"--lame-duck-limit={limit}s" in activator["containers"][0]["args"]
    assert activator["terminationGracePeriodSeconds"] == limit + 30 + 15


@pytest.mark.parametrize(("values", "flags"), [
    ({}, ["--cold-start-probe=true", "--fast-lane=true"]),
    ({"activator": {"fastLane": False, "coldStartProbe": False}}, ["--cold-start-probe=false", "--fast-lane=false"]),
])
def test_the_data_path_switches_reach_the_activator(render_values, values, flags):
    """Both data-path shortcuts are on by default and each can be turned off from values."""
    docs = render_values(values)
    args = one(docs, "Deployment", "zeroscale-activator")["spec"]["template"]["spec"]["containers"][0]["args"]
    for flag in flags:
        assert flag in args
