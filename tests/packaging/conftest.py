"""Shared fixtures: the repository, renders of the chart, the kustomize output.

A missing tool fails the tests with what to install; CI installs them all, so nothing
here is skipped silently.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import render  # noqa: E402  (the path above makes it importable)

VALUES = sorted((HERE / "values").glob("*.yaml"))


def _require_helm_sdk():
    try:
        import helm_python  # noqa: F401
    except ImportError:
        pytest.fail(
            "helm-python-sdk is not installed: python3 -m pip install -r tests/packaging/requirements.txt",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def helm():
    _require_helm_sdk()
    import helm_python

    return helm_python


@pytest.fixture(scope="session")
def render_values(helm):
    """Renders the chart with a values dict (release zeroscale in zeroscale-system)."""

    def run(values: dict | None = None, **kwargs) -> list[dict]:
        return render.documents(render.render(values or {}, **kwargs))

    return run


@pytest.fixture(scope="session")
def default_docs(render_values) -> list[dict]:
    return render_values({})


def kustomize(path: str) -> list[dict]:
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed; it renders config/ (kubectl kustomize)", pytrace=False)
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{out.stderr}", pytrace=False)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]
