"""config/: `kubectl apply -k config/default` installs what the chart installs with its
default values, and the copies of generated files are current."""

from __future__ import annotations

import copy
import re

import yaml

from conftest import ROOT, find, kustomize, one

# Labels only one of the two tools sets; everything else must be equal.
TOOL_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by"}
HASHED_CONFIGMAP = re.compile(r"^(zeroscale-defaults)-[a-z0-9]{10}$")


def normalize(doc: dict) -> dict:
    """What the install means, without the marks of the tool that made it."""
    doc = copy.deepcopy(doc)

    def strip(meta: dict):
        labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in TOOL_LABELS}
        meta.pop("labels", None)
        if labels:
            meta["labels"] = {k: str(v) for k, v in labels.items()}
        annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith("checksum/")}
        meta.pop("annotations", None)
        if annotations:
            meta["annotations"] = annotations

    strip(doc["metadata"])
    if doc["kind"] == "CustomResourceDefinition":
        doc["metadata"].pop("labels", None)
    if doc["kind"] == "ConfigMap":
        doc["metadata"]["name"] = HASHED_CONFIGMAP.sub(r"\1", doc["metadata"]["name"])
        doc["data"] = {k: yaml.safe_load(v) for k, v in doc["data"].items()}
    template = doc.get("spec", {}).get("template")
    if template and "metadata" in template:
        strip(template["metadata"])
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = HASHED_CONFIGMAP.sub(r"\1", volume["configMap"]["name"])
    return doc


def key(doc: dict) -> tuple:
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def test_default_renders_and_installs_what_the_chart_installs(default_docs):
    ours = {key(normalize(d)): normalize(d) for d in kustomize("config/default") if d["kind"] != "Namespace"}
    chart = {key(d): normalize(d) for d in default_docs}
    assert sorted(ours) == sorted(chart), "config/default and the chart install different objects"
    for k in chart:
        assert ours[k] == chart[k], f"{k} differs between config/default and the chart's defaults"


def test_default_namespace_enforces_restricted_pod_security():
    (namespace,) = find(kustomize("config/default"), "Namespace")
    assert namespace["metadata"]["name"] == "zeroscale-system"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_defaults_configmap_is_hashed_so_edits_roll_the_pods():
    docs = kustomize("config/default")
    (config,) = find(docs, "ConfigMap")
    assert HASHED_CONFIGMAP.match(config["metadata"]["name"])
    for deploy in find(docs, "Deployment"):
        assert deploy["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]


def test_bases_render_on_their_own():
    for base in ("config/crd", "config/rbac", "config/manager", "config/samples"):
        assert kustomize(base), f"{base} renders nothing"


def test_crd_copy_is_the_generated_one():
    assert (ROOT / "config/crd/function.yaml").read_text() == (ROOT / "crds/function.yaml").read_text(), (
        "config/crd/function.yaml is stale: cp crds/function.yaml config/crd/"
    )


def test_samples_are_the_examples():
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
    samples = sorted(p.name for p in (ROOT / "config/samples").glob("*.yaml") if p.name != "kustomization.yaml")
    assert samples == examples, "config/samples should hold every example: cp examples/*.yaml config/samples/"
    for name in examples:
        assert (ROOT / "config/samples" / name).read_text() == (ROOT / "examples" / name).read_text(), (
            f"config/samples/{name} is stale: cp examples/{name} config/samples/"
        )
    functions = find(kustomize("config/samples"), "Function")
    assert len(functions) == len(examples)
    # The samples keep their own namespaces (config/default's would move them).
    assert {f["metadata"]["namespace"] for f in functions} == {"default"}


def test_operator_points_at_the_activator_service():
    docs = kustomize("config/default")
    operator = one(docs, "Deployment", "zeroscale-operator")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    (flag,) = [a for a in args if a.startswith("--activator-service=")]
    namespace, name = flag.split("=", 1)[1].split("/")
    assert namespace == "$(POD_NAMESPACE)" and one(docs, "Service", name)
