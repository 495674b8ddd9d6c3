# edge-infer developer entry points. Everything installs into a local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=

# The add-on's build context carries the wheel of this tree (addon/Dockerfile installs it).
.PHONY: addon demo test test-install test-arm64 test-ha lint bench models install install-demo mosquitto clean help

help:
	@echo "make demo      embedded broker + simulated home + bundled models, live predictions"
	@echo "make test      install everything the tests need and run them (not the install paths)"
	@echo "make test-install  the wheel, the add-on run script and the systemd unit end to end"
	@echo "make test-arm64  the daemon and the int8 zoo under arm64 emulation (docs/arm64.md)"
	@echo "make test-ha   the discovery against a real Home Assistant Core (docs/homeassistant.md)"
	@echo "make lint      ruff check, ruff format --check, mypy (strict on edge/ and devices/)"
	@echo "make bench     benchmark suite against a local Mosquitto"
	@echo "make addon     rebuild the wheel in the add-on's build context (after any change to the package)"
	@echo "make models    rebuild the bundled model zoo (needs the train extra)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The daemon and the demo need no torch.
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

# torch is pinned to the CPU build *before* the train extra, so nothing pulls a CUDA build.
$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[train,demo,dev,fast]'
	touch $@ $(VENV)/.installed-demo

install-demo: $(VENV)/.installed-demo
install: $(VENV)/.installed-all

mosquitto:
	@scripts/ensure-mosquitto.sh

demo: $(VENV)/.installed-demo
	$(BIN)/edge-infer demo $(DEMO_ARGS)

# The suite without the install paths (about 7 minutes on 2 cores); test-install runs those
# (the built wheel in a fresh venv, the add-on's run script, systemd/install.sh and the unit's
# ExecStart: about 4 minutes). CI runs both.
test: $(VENV)/.installed-all mosquitto
	$(BIN)/python -m pytest -q -m "not install" $(PYTEST_ARGS)

test-install: $(VENV)/.installed-all mosquitto
	$(BIN)/python -m pytest -q -m install $(PYTEST_ARGS)

# arm64 (Raspberry Pi 4/5) under qemu-user: sysroot and aarch64 wheels cached in $(ARM64_CACHE).
ARM64_CACHE ?= .cache/arm64
ARM64_CPU ?= cortex-a72
ARM64_ARGS ?=
test-arm64: $(VENV)/.installed-all mosquitto
	ARM64_CACHE=$(ARM64_CACHE) ARM64_CPU=$(ARM64_CPU) PYTHON=$(BIN)/python scripts/arm64/test.sh $(ARM64_ARGS)

# A real Home Assistant Core in its own virtual environment (Python 3.13), built once.
HA_VENV ?= .cache/ha-venv
# The newest release that runs here: it asks for Python 3.13.2, so its gate is lowered to 3.13.0
# (docs/homeassistant.md); HA_VENV_NEW= (empty) tests 2025.4.4 only.
HA_VENV_NEW ?= .cache/ha-venv-2026
HA_VERSION_NEW ?= 2026.2.3
# Every test that needs a real Home Assistant: discovery, the open-set enum, and (on 2025.4.4) the
# history sources and learn end to end (the NILM path trains twice: about 9 of its minutes).
HA_TESTS = tests/test_ha_real.py tests/test_ha_open_set.py tests/test_ha_corrections.py \
	tests/test_ha_linking.py tests/test_ha_faults.py tests/test_ha_quality.py tests/test_ha_retrain.py
HA_LEARN_TESTS = tests/test_ha_history.py tests/test_learn_ha_e2e.py tests/test_learn_ha_motion.py \
	tests/test_learn_ha_anomaly.py
# A cached venv is rebuilt when the setup script changed (it decides what the venv holds, e.g. the
# tasmota integration's requirements): a stamp named after the script's hash.
HA_SETUP_ID := $(shell sha256sum tests/ha/setup_ha_venv.sh | cut -c1-16)
test-ha: $(VENV)/.installed-all mosquitto
	test -f $(HA_VENV)/.setup-$(HA_SETUP_ID) || { rm -rf $(HA_VENV) && \
	  tests/ha/setup_ha_venv.sh $(HA_VENV) && touch $(HA_VENV)/.setup-$(HA_SETUP_ID); }
	EDGE_INFER_HA_VENV=$(HA_VENV) $(BIN)/python -m pytest -q $(HA_TESTS) $(HA_LEARN_TESTS)
	if [ -n "$(HA_VENV_NEW)" ]; then \
	  { test -f $(HA_VENV_NEW)/.setup-$(HA_SETUP_ID) || { rm -rf $(HA_VENV_NEW) && \
	    HA_VERSION=$(HA_VERSION_NEW) HA_LOWER_PYTHON_GATE=1 tests/ha/setup_ha_venv.sh $(HA_VENV_NEW) && \
	    touch $(HA_VENV_NEW)/.setup-$(HA_SETUP_ID); }; } && \
	  EDGE_INFER_HA_VENV=$(HA_VENV_NEW) $(BIN)/python -m pytest -q $(HA_TESTS); \
	fi

lint: $(VENV)/.installed-all
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy edge devices exporters

bench: $(VENV)/.installed-all mosquitto
	$(BIN)/python -m bench $(BENCH_ARGS)

addon: $(VENV)/.installed-all
	rm -rf addon/wheels && mkdir -p addon/wheels
	SOURCE_DATE_EPOCH=315532800 $(BIN)/python -m build --wheel --no-isolation --outdir addon/wheels .
	rm -rf build

models: $(VENV)/.installed-all
	$(BIN)/python -m exporters.zoo

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache build *.egg-info
