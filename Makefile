# Developer entry points for media-clustering. Run `make` (or `make help`) to list targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
DATABASE_URL ?= postgres://postgres:postgres@127.0.0.1:5432/media_clustering_demo
COMPOSE ?= $(shell command -v docker-compose >/dev/null 2>&1 && echo docker-compose || echo docker compose)
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: help demo test services model build release lint fmt migrate bench k8s-check compose-check clean-demo

help: ## Show this list of targets
	@echo "Usage: make <target>"
	@echo
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

demo: ## Start services, build, migrate, run the server and upload tests/fixtures/photos (ARGS="folder ...")
	scripts/demo.sh $(ARGS)

test: ## Run services + model setup, rustfmt check, clippy and all tests (what CI runs; SKIP_LINT=1 to skip lint)
	scripts/test.sh $(ARGS)

services: ## Make sure local Redis and PostgreSQL are installed and running
	scripts/ensure-services.sh

model: ## Download and verify the pinned ONNX model and derive the 8-bit default from it, into models/
	scripts/fetch-model.sh

build: ## Build the debug binary
	$(CARGO) build --bin media-clustering

release: ## Build the optimised release binary
	$(CARGO) build --release --bin media-clustering

lint: ## Check formatting and run clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format all Rust code in place
	$(CARGO) fmt --all

migrate: build ## Apply database migrations (DATABASE_URL defaults to the demo database)
	scripts/ensure-services.sh
	scripts/create-db.sh "$(DATABASE_URL)"
	DATABASE_URL="$(DATABASE_URL)" $(TARGET_DIR)/debug/media-clustering migrate

bench: ## Run scripts/bench.sh if it exists
	@if [ -x scripts/bench.sh ]; then scripts/bench.sh $(ARGS); \
	elif [ -f scripts/bench.sh ]; then bash scripts/bench.sh $(ARGS); \
	else echo "scripts/bench.sh not found; nothing to do"; fi

k8s-check: ## Render deploy/k8s overlays and validate them (schemas, CRDs, checkov, config keys)
	$(CARGO) build --bin media-clustering
	scripts/check-k8s.sh $(TARGET_DIR)/debug/media-clustering

compose-check: ## Validate docker-compose.yml
	$(COMPOSE) -f docker-compose.yml config -q && echo "docker-compose.yml is valid"

clean-demo: ## Remove demo state: .demo/, the demo database and the demo Redis stream
	rm -rf .demo
	-psql "postgres://postgres:postgres@127.0.0.1:5432/postgres" -X -q \
		-c 'DROP DATABASE IF EXISTS media_clustering_demo WITH (FORCE)'
	-redis-cli -h 127.0.0.1 -p 6379 DEL media:cluster:jobs:demo >/dev/null
