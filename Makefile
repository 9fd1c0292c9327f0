# sluice: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
DEMO_COUNT ?= 1000000
DEMO_RATE ?= 100000
DEMO_LISTEN ?= 127.0.0.1:9095

.PHONY: cluster-up cluster-down images-local setup demo test test-unit lint vendor-check fmt bench bench-operator profile chaos chaos-replicated fuzz crds manifests chart-lint images dashboards rules-test kafka-start kafka-stop kafka-reset k8s-install k8s-start k8s-stop clean

setup:
	@scripts/setup.sh

## The demo, the benchmarks and the profile use no OAuth: the broker they start leaves its
## OAUTHBEARER listener out, so they neither install nor start Keycloak (scripts/oidc.sh).
## A broker already running with that listener is kept as it is.
demo bench bench-operator profile: export SLUICE_KAFKA_OAUTH ?= 0

## Run a real pipeline against a local Kafka with a load generator and live progress.
## DEMO_LISTEN is the in-process worker's metrics address; the broker is the local one of
## scripts/kafka.sh (SLUICE_KAFKA_PORT), or SLUICE_BOOTSTRAP.
demo:
	@scripts/setup.sh demo
	@if [[ -z "$${SLUICE_BOOTSTRAP:-}" ]]; then scripts/kafka.sh start; fi
	$(CARGO) build --release -p sluice-loadgen
	SLUICE_BOOTSTRAP="$${SLUICE_BOOTSTRAP:-127.0.0.1:$${SLUICE_KAFKA_PORT:-9092}}" \
	  ./target/release/sluice-loadgen demo --count $(DEMO_COUNT) --rate $(DEMO_RATE) --listen $(DEMO_LISTEN)

## Every test: unit, property and integration tests against the real broker, a real
## PostgreSQL, a real kube-apiserver, and the end-to-end suite on a real single-node
## Kubernetes (scripts/cluster.sh, images from scripts/images.sh).
## SLUICE_TEST_BOOTSTRAP=host:port runs them against another Kafka or Redpanda;
## SLUICE_TEST_POSTGRES=url against another PostgreSQL (with SLUICE_TEST_POSTGRES_CA=ca.pem
## for its TLS test); SLUICE_TEST_REGISTRY=url against another Confluent-compatible schema
## registry (default: Apicurio Registry, scripts/registry.sh; the records are written and read
## by Confluent's Python client, scripts/registry-roundtrip.py, in a virtualenv it makes); SLUICE_TEST_KUBECONFIG=path against another API server;
## SLUICE_E2E_KUBECONFIG=path (and SLUICE_E2E_*, see tests/src/cluster.rs) on another cluster.
## Every test binary runs even when one fails; the end lists every failed test.
## `kafka.sh start` starts the OpenID Connect server (Keycloak, scripts/oidc.sh) first: the
## broker's OAUTHBEARER listener trusts it, and the OAuth tests fetch their tokens from it.
test: setup vendor-check
	@if [[ -z "$${SLUICE_TEST_BOOTSTRAP:-}" ]]; then scripts/kafka.sh start; fi
	@if [[ -z "$${SLUICE_TEST_POSTGRES:-}" ]]; then scripts/postgres.sh start; fi
	@if [[ -z "$${SLUICE_TEST_REGISTRY:-}" ]]; then scripts/registry.sh start; fi
	@python3 scripts/registry-roundtrip.py setup >/dev/null
	@if [[ -z "$${SLUICE_TEST_KUBECONFIG:-}" ]]; then scripts/k8s.sh start; fi
	@if [[ -z "$${SLUICE_E2E_KUBECONFIG:-}" ]]; then scripts/cluster.sh up && scripts/images.sh load; fi
	$(CARGO) build --workspace --all-targets
	@CARGO=$(CARGO) scripts/run-tests.sh

## Unit and property tests only (no broker).
test-unit:
	$(CARGO) test --workspace --lib --bins

lint: vendor-check
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## vendor/rdkafka-sys is the published rdkafka-sys, trimmed, plus exactly vendor/patches/*.patch
## (vendor/patches/README.md). `scripts/vendor-check.sh --write` rebuilds it from them.
vendor-check:
	@scripts/vendor-check.sh

fmt:
	$(CARGO) fmt --all

## Benchmarks (see BENCHMARKS.md). Pins the broker and the clients to different cores.
bench: setup
	scripts/bench.sh

## The operator at scale (BENCHMARKS.md): its own kube-apiserver and the broker, 100, 1,000 and
## 10,000 pipelines over 100 shared topics. COUNTS=100,1000 for a shorter run.
bench-operator: setup
	scripts/bench-operator.sh

## Instructions per record and per stage (valgrind callgrind) of a fixed small workload:
## repeatable on a noisy machine (BENCHMARKS.md, "Where the CPU goes"). `make bench` runs it too.
profile: setup
	scripts/profile.sh

## The fault harness at full length (RELIABILITY.md's figures): every scenario under load,
## against the real broker and PostgreSQL. `make test` runs the short version.
chaos: setup kafka-start
	scripts/postgres.sh start
	$(CARGO) build --release -p sluice-worker -p sluice-testkit
	mkdir -p target/chaos
	set -o pipefail; ./target/release/sluice-chaos --full --worker ./target/release/sluice-worker $(SCENARIOS) | tee target/chaos/results.md

## The fault scenarios on a replicated cluster (three brokers from scripts/kafka-cluster.sh,
## started on first use; SLUICE_KAFKA_CLUSTER_PORT/_DIR choose its ports and directory),
## each under both delivery guarantees: RELIABILITY.md, "A replicated cluster".
chaos-replicated: setup
	scripts/postgres.sh start
	$(CARGO) build --release -p sluice-worker -p sluice-testkit --bins --examples
	mkdir -p target/chaos
	set -o pipefail; ./target/release/sluice-chaos --replicated --full --worker ./target/release/sluice-worker $(SCENARIOS) | tee target/chaos/replicated.md

## A longer fuzzing run than the tests' (1,000-2,000 cases per target): the configuration
## parser, the record decoding, the jq input path, the postgres row decoding and the
## dead-letter headers. FUZZ_CASES=N sets the cases per target (default 200000).
FUZZ_CASES ?= 200000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release -p sluice-api -p sluice-worker --lib fuzz_ -- --test-threads=2

## Regenerate the checked-in CRD, and its copies in the chart and the plain install.
crds:
	$(CARGO) run -q -p sluice-controller --bin crdgen > crds/streampipeline.yaml
	$(MAKE) manifests

## Regenerate the plain install (manifests/install) from the chart (a test fails when stale).
manifests:
	@T=$$(scripts/tools.sh path); cp crds/streampipeline.yaml charts/sluice/crds/streampipeline.yaml; \
	  cp crds/streampipeline.yaml manifests/install/crd.yaml; \
	  $$T/helm template sluice charts/sluice --namespace sluice-system > manifests/install/sluice.yaml

## Regenerate the Grafana dashboards (grafana/ and the chart's copy).
dashboards:
	python3 scripts/gen_dashboards.py grafana
	python3 scripts/gen_dashboards.py charts/sluice/dashboards

## Check and unit-test the alert rules with promtool.
rules-test:
	promtool check rules charts/sluice/rules/sluice.rules.yaml
	promtool test rules tests/prometheus/sluice.rules.test.yaml

## Lint the Helm chart.
chart-lint:
	@T=$$(scripts/tools.sh path); $$T/helm lint charts/sluice && $$T/helm lint charts/sluice --set monitoring.serviceMonitor.enabled=true

## The local single-node Kubernetes (scripts/cluster.sh) with sluice's images imported.
cluster-up: setup kafka-start
	@scripts/cluster.sh up
	@scripts/images.sh load
	$(CARGO) build --release -p sluice-loadgen

cluster-down:
	@scripts/cluster.sh down

## The images built without Docker (scripts/images.sh), as tarballs in target/images.
images-local:
	@scripts/images.sh build

## Container images (needs a Docker engine; none runs on the CI machines).
images:
	docker build -f docker/worker.Dockerfile -t ghcr.io/sluice-dev/sluice-worker:0.1.0 .
	docker build -f docker/controller.Dockerfile -t ghcr.io/sluice-dev/sluice-controller:0.1.0 .

## Build kube-apiserver and etcd from Go modules into the cache (operator integration tests).
k8s-install:
	@scripts/k8s.sh install

k8s-start:
	@scripts/k8s.sh start

k8s-stop:
	@scripts/k8s.sh stop

kafka-start:
	@scripts/kafka.sh start

kafka-stop:
	@scripts/kafka.sh stop
	@scripts/oidc.sh stop

kafka-reset:
	@scripts/kafka.sh reset
	@scripts/oidc.sh reset

clean:
	$(CARGO) clean
