"""The Dockerfile, checked by construction (no container engine here to build it):
multi-stage, a locked release build, only the binary in a small non-root runtime."""

from __future__ import annotations

import json
import re

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), comments dropped and continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_multi_stage_with_a_locked_release_build():
    build, runtime = stages()[0], stages()[-1]
    assert len(stages()) >= 2
    assert re.search(r"\bAS build\b", build[0][1])
    runs = " ".join(args for word, args in build if word == "RUN")
    assert "cargo build --release --locked" in runs
    assert "--bin zeroscale" in runs
    assert not any(word == "RUN" for word, _ in runtime), "the runtime stage only receives the binary"


def test_runtime_is_small_and_runs_as_non_root():
    runtime = stages()[-1]
    base = runtime[0][1]
    assert base.startswith("gcr.io/distroless/") and base.endswith(":nonroot"), base
    copies = [args for word, args in runtime if word == "COPY"]
    assert copies == ["--from=build /zeroscale /zeroscale"], "only the zeroscale binary"
    users = [args for word, args in runtime if word == "USER"]
    # Numeric: the kubelet checks runAsNonRoot against it without /etc/passwd.
    assert users == ["65532:65532"]
    entrypoints = [json.loads(args) for word, args in runtime if word == "ENTRYPOINT"]
    assert entrypoints == [["/zeroscale"]]


def test_build_context_leaves_out_build_output():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "target/" in ignored and ".git/" in ignored


def test_rust_matches_the_crate():
    """The builder's Rust is at least the crate's rust-version."""
    crate = re.search(r'^rust-version\s*=\s*"([0-9.]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    image = re.search(r"^ARG RUST_VERSION=([0-9.]+)", DOCKERFILE, re.M)
    assert crate and image
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(image.group(1)) >= as_tuple(crate.group(1))
