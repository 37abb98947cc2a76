#!/usr/bin/env python3
"""Renders the zeroscale Helm chart offline and prints multi-document YAML.

What `helm template --include-crds` prints, without a helm binary: Helm's SDK
(helm-python-sdk) renders the chart. tests/packaging.rs and the pytest suite use it.

    python3 tests/packaging/render.py [VALUES.yaml ...] [--name N] [--namespace NS]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import yaml

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "zeroscale"
RELEASE = "zeroscale"
NAMESPACE = "zeroscale-system"


def load_values(paths: list[pathlib.Path]) -> dict:
    """Merges values files left to right, as `helm -f a -f b` does (maps deep, rest replaced)."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    values: dict = {}
    for path in paths:
        values = merge(values, yaml.safe_load(path.read_text()) or {})
    return values


def render(values: dict | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, CRDs first (as Helm installs them), NOTES.txt left out."""
    import helm_python as helm  # imported late so --help works without the SDK

    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        out = {f"crds/{crd['filename']}": crd["data"] for crd in chart.crds}
        rendered = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    for path in sorted(rendered):
        if not path.endswith("NOTES.txt"):
            out[path] = rendered[path]
    return out


def documents(rendered: dict[str, str]) -> list[dict]:
    """Every non-empty YAML document of a render, parsed."""
    docs = []
    for text in rendered.values():
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("values", nargs="*", type=pathlib.Path, help="values files, merged in order")
    parser.add_argument("--name", default=RELEASE, help="release name")
    parser.add_argument("--namespace", default=NAMESPACE, help="release namespace")
    args = parser.parse_args()
    rendered = render(load_values(args.values), args.name, args.namespace)
    for path, text in rendered.items():
        if text.strip():
            sys.stdout.write(f"---\n# Source: {path}\n{text.strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
