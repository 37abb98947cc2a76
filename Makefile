# zeroscale developer targets. `make test` is what CI runs (see .ci/run).
CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: build test unit lint fmt crds crds-check run bench bench-coldstart bench-cluster e2e docker-build chart-test

build:
	$(CARGO) build --release

## Everything CI checks: formatting, clippy, CRD drift, all tests.
test: lint crds-check unit chart-test

unit:
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --no-fail-fast
else
	$(CARGO) test --no-fail-fast
endif

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Regenerate crds/ (and its copies in the chart and kustomize) from the Rust types.
crds:
	$(CARGO) run --quiet -- crd > crds/function.yaml
	cp crds/function.yaml charts/zeroscale/crds/function.yaml
	cp crds/function.yaml config/crd/function.yaml

## Fail when crds/ is not what `zeroscale crd` prints.
crds-check:
	@mkdir -p target
	$(CARGO) run --quiet -- crd > target/function-crd.yaml
	@diff -u crds/function.yaml target/function-crd.yaml \
		|| (echo "crds/function.yaml is stale: run 'make crds'" && exit 1)

## The quick start: run the examples locally, no cluster needed.
run:
	$(CARGO) run -- dev -f examples/

## Helm chart and kustomize checks (needs python3; .ci/run installs the packages).
chart-test:
	@if [ -d tests/packaging ]; then python3 -m pytest -q tests/packaging; fi

## Benchmarks: data path, cold start, memory, autoscaler (see BENCHMARKS.md).
bench:
	@if [ -x bench/run.sh ]; then bench/run.sh; else echo "no benchmark harness yet"; fi

## Cold start from zero next to the platform floor, on the cluster in KUBECONFIG
## (ZEROSCALE_BENCH_WAKES wakes of each, 10 by default; see BENCHMARKS.md, issue 15).
bench-coldstart:
	$(CARGO) test --test e2e_cluster -- --ignored --nocapture --exact bench_cold_start_against_the_platform_floor

## Scale benchmark on the cluster in KUBECONFIG (issue 16; see BENCHMARKS.md): N Functions
## at once, then readiness, memory, API requests, a wake, and activator changes under
## load. ZEROSCALE_E2E_IMAGE names the image the chart runs (the stand-in maps it to a
## binary). Not run by CI.
N ?= 1000
bench-cluster:
	ZEROSCALE_SCALE_FUNCTIONS=$(N) ZEROSCALE_SCALE_REPORT=target/bench-cluster-$(N).json \
		$(CARGO) test --test e2e_scale -- --ignored --nocapture --test-threads=1

## Real-cluster suite against the cluster in KUBECONFIG (skipped when none).
e2e:
	$(CARGO) test --test e2e_cluster --test e2e_standin -- --ignored --test-threads=1 --skip bench_

## The container image (see Dockerfile). DOCKER=podman works too.
DOCKER ?= docker
IMAGE ?= zeroscale:dev
docker-build:
	$(DOCKER) build -t $(IMAGE) .
