# dicom_assets: the two set-up commands are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SPARK_STAMP := $(VENV)/.installed-spark
LAKE ?= $(CURDIR)/data/lake
export DAGSTER_HOME ?= $(CURDIR)/data/dagster_home
export DAGSTER_TELEMETRY_DISABLED := 1

.PHONY: run test ui bench sample clean lint bytecode

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(SPARK_STAMP): setup.py $(STAMP)
	$(BIN)/pip install -q -e '.[dev,spark]'
	touch $@

# An editable install leaves our own modules' bytecode to their first import,
# and where PYTHONDONTWRITEBYTECODE is set (CI images, containers) every new
# process (Dagster step, pool helper) compiled them again: ~0.45 s per process
# importing the definitions. compileall writes only what is stale (~0.1 s).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q dicom_assets benchmarks

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

## run: install, generate the small sample, materialise every asset of today, print a summary
run: $(STAMP) bytecode $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dicom-assets sample --size small --lake $(LAKE)
	$(BIN)/dicom-assets run --lake $(LAKE) --settle-seconds 0

## test: the whole suite (pure, Dagster in-process, end to end, Spark)
test: $(SPARK_STAMP) bytecode
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup dicom_assets_tests

## ui: the Dagster web UI on http://127.0.0.1:3000
ui: $(STAMP) bytecode $(DAGSTER_HOME)/dagster.yaml
	DICOM_ASSETS_LAKE=$(LAKE) $(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

## bench: throughput and memory figures into benchmarks/results/
bench: $(SPARK_STAMP) bytecode
	$(BIN)/python -m benchmarks.run_all

sample: $(STAMP)
	$(BIN)/dicom-assets sample --size small --lake $(LAKE)

lint: $(STAMP)
	$(BIN)/ruff check dicom_assets dicom_assets_tests
	$(BIN)/mypy dicom_assets/dicom dicom_assets/fhir dicom_assets/omop

clean:
	rm -rf $(LAKE) $(DAGSTER_HOME)
