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

.PHONY: install chromium synth lint test run deploy stop clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed node_modules/.installed

# Headless Chromium for the report's browser test (Debian's package); without it that test skips, saying so.
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "could not install chromium: the browser test will skip"

synth: install
	$(CDK) synth -q --no-notices -o cdk.out $(CONTEXT)
	$(CDK) synth -q --no-notices -o cdk.out.prod -c env=prod $(CONTEXT)

lint: synth
	$(VENV)/bin/cfn-lint cdk.out/*.template.json cdk.out.prod/*.template.json

test: lint chromium
	$(PY) -m pytest -q

run: synth
	$(PY) -m local up

deploy: install
	$(CDK) deploy $(STACKS) --no-notices $(CONTEXT)

stop: install
	$(PY) -m local down

clean:
	rm -rf cdk.out cdk.out.prod .pytest_cache
