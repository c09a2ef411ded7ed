# scones: `make run` runs the whole workflow on this machine, `make test` checks everything.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
CDK := npx --no-install cdk
# The pinned CDK CLI warns on Node 20 at every start; the warning is about support, not behaviour.
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export CDK_DISABLE_CLI_TELEMETRY := true
# Extra context for synth and deploy, e.g. `make deploy CONTEXT="-c env=prod -c alarm_email=ops@example.com"`.
CONTEXT ?=
# What `make deploy` deploys, e.g. `make deploy STACKS=SconesDevEndpoint`.
STACKS ?= --all

.PHONY: help install chromium synth lint test test-fast run deploy stop clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed node_modules/.installed ## the Python venv and the pinned CDK CLI

chromium: ## headless Chromium (Debian's) for the report's browser test, which skips without it
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "could not install chromium: the browser test will skip"

synth: install ## cdk synth into cdk.out (dev) and cdk.out.prod
	$(CDK) synth -q --no-notices -o cdk.out $(CONTEXT)
	$(CDK) synth -q --no-notices -o cdk.out.prod -c env=prod $(CONTEXT)

lint: synth ## ruff, ruff format --check, cfn-lint of the templates
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/cfn-lint cdk.out/*.template.json cdk.out.prod/*.template.json

test: lint chromium ## lint and every test (what CI runs)
	$(PY) -m pytest -q

test-fast: install ## the tests not marked slow: synth, config, handlers, constructs (2 to 3 minutes here)
	$(PY) -m pytest -q -m "not slow"

run: synth ## the whole workflow on this machine (moto, local endpoint)
	$(PY) -m local up

deploy: install ## cdk deploy to your AWS account; the stacks' outputs land in outputs.json
	$(CDK) deploy $(STACKS) --no-notices --outputs-file outputs.json $(CONTEXT)

stop: install ## stop what `make run` left running
	$(PY) -m local down

clean: ## remove synth output and caches
	rm -rf cdk.out cdk.out.prod .pytest_cache
