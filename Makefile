# Every target that needs Python creates .venv and installs the pinned dependencies first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CAMSERVE := $(VENV)/bin/camserve
INSTALLED := $(VENV)/.installed
SHAPES_FILES := $(wildcard models/shapes/*)
SHAPES_MULTI_FILES := $(wildcard models/shapes-multi/*)
CORE_FILES := $(shell find camserve handlers -name '*.py' -o -name '*.json' 2>/dev/null)
HARNESS := $(PY) -m harness

.PHONY: serve stop test lint format train train-multi evaluate archive calibrate calibrate-shapes venv clean monitor monitor-stop \
	gallery kserve-bundle bench bench-gpu soak system-deps report-screenshot

# The Debian packages whose commands the targets run. A target that needs some lists
# system-deps first among its prerequisites and, unless it needs all of them, names its own:
#   screenshot: SYSTEM_PACKAGES = $(BROWSER_PACKAGES)
#   screenshot: system-deps ...
# (a target-specific value reaches the prerequisite's recipe; with several goals in one make
# run, the first goal's list is checked). harness/system_deps.sh checks them, installs the
# missing ones with apt-get (sudo when not root), prints nothing when none is missing, and
# otherwise stops the target with one line naming the packages and the command to run.
JAVA_PACKAGE := openjdk-17-jre-headless
PROMETHEUS_PACKAGE := prometheus
BROWSER_PACKAGES := chromium chromium-driver
SYSTEM_PACKAGES = $(JAVA_PACKAGE) $(PROMETHEUS_PACKAGE) $(BROWSER_PACKAGES)

system-deps:
	@sh harness/system_deps.sh $(SYSTEM_PACKAGES)

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

model_store/shapes.mar: $(INSTALLED) $(SHAPES_FILES) $(CORE_FILES)
	$(CAMSERVE) archive --model-dir models/shapes --name shapes --export-path model_store

model_store/shapes-multi.mar: $(INSTALLED) $(SHAPES_MULTI_FILES) $(CORE_FILES)
	$(CAMSERVE) archive --model-dir models/shapes-multi --name shapes-multi --export-path model_store

# `make archive` builds the shapes archive; `make archive ARCH=resnet50 WEIGHTS=my.pth` packs a
# torchvision CNN (extra options: ARCHIVE_ARGS="--labels labels.txt --input-size 224 ...").
ARCH ?=
WEIGHTS ?=
ARCHIVE_ARGS ?=
ifeq ($(ARCH),)
archive: model_store/shapes.mar
else
archive: $(INSTALLED)
	$(CAMSERVE) archive --arch $(ARCH) --weights $(WEIGHTS) --export-path model_store $(ARCHIVE_ARGS)
endif

# `make calibrate MAR=model_store/resnet50.mar IMAGES=./images` -> model_store/resnet50_calibrated.mar
calibrate: $(INSTALLED)
	$(CAMSERVE) calibrate $(MAR) $(IMAGES) $(CALIBRATE_ARGS)

# Recomputes models/shapes/calibration.pt on the shapes training set (after `make train`).
SHAPES_CALIBRATION_COUNT ?= 4000
calibrate-shapes: $(INSTALLED)
	$(HARNESS).shapes.calibrate --count $(SHAPES_CALIBRATION_COUNT)

# `make serve MODELS=resnet50=resnet50_calibrated.mar` serves another archive of model_store/
# (several: comma-separated).
MODELS ?= shapes=shapes.mar,shapes-multi=shapes-multi.mar
serve: SYSTEM_PACKAGES = $(JAVA_PACKAGE)
serve: system-deps model_store/shapes.mar model_store/shapes-multi.mar
	$(HARNESS).local_torchserve serve --models $(MODELS)

stop: $(INSTALLED)
	$(HARNESS).local_torchserve stop

# A local Prometheus (Debian's package, installed when missing) scraping the TorchServe of
# `make serve`, with the alert rules of config/prometheus; see docs/monitoring.md.
monitor: SYSTEM_PACKAGES = $(PROMETHEUS_PACKAGE)
monitor: system-deps $(INSTALLED)
	$(HARNESS).local_prometheus start

monitor-stop: $(INSTALLED)
	$(HARNESS).local_prometheus stop

test: system-deps model_store/shapes.mar model_store/shapes-multi.mar
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# The long reliability run (docs/reliability.md): 32 verified clients for 2 minutes on the
# production config (worker RSS compared after minute 1), then a worker kill mid-load.
# Writes bench/results/<date>-soak.json; exits non-zero when a check fails.
soak: SYSTEM_PACKAGES = $(JAVA_PACKAGE)
soak: system-deps $(INSTALLED)
	$(PY) -m tests.load --clients 32 --duration 120 --warmup 60

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Reproduces models/shapes/shapes.pt (see models/shapes/training.json for the record).
train: $(INSTALLED)
	$(HARNESS).shapes.train --seed 0 --out models/shapes
	$(HARNESS).shapes.calibrate --count $(SHAPES_CALIBRATION_COUNT)
	$(HARNESS).shapes.evaluate --model-dir models/shapes

evaluate: $(INSTALLED)
	$(HARNESS).shapes.evaluate --model-dir models/shapes
	$(HARNESS).shapes.evaluate --multi-label --model-dir models/shapes-multi

# Reproduces models/shapes-multi/shapes-multi.pt, its calibration and metrics (the record:
# models/shapes-multi/training.json).
train-multi: $(INSTALLED)
	$(HARNESS).shapes.train --multi-label --seed 0 --count 16000 --epochs 14 --out models/shapes-multi
	$(HARNESS).shapes.calibrate --multi-label --model-dir models/shapes-multi --count $(SHAPES_CALIBRATION_COUNT)
	$(HARNESS).shapes.evaluate --multi-label --model-dir models/shapes-multi

# Explanations on generated shapes images, most stable first: docs/gallery.png,
# docs/overview.png (the README picture) and .run/gallery/index.html.
gallery: $(INSTALLED)
	$(HARNESS).gallery --model-dir models/shapes --count 24 \
		--png docs/gallery.png --overview docs/overview.png --html .run/gallery/index.html
	$(HARNESS).figures --model-dir models/shapes --out docs/score.png

# `camserve report` of examples/ on a TorchServe of its own, and its screenshot in headless
# Chromium (Debian's chromium and chromium-driver): docs/report.png, .run/report-examples/.
report-screenshot: SYSTEM_PACKAGES = $(JAVA_PACKAGE) $(BROWSER_PACKAGES)
report-screenshot: system-deps model_store/shapes.mar
	$(HARNESS).report_screenshot --out .run/report-examples --png docs/report.png

# The storage layout of KServe's TorchServe runtime: config/config.properties + model-store/*.mar.
kserve-bundle: $(INSTALLED)
	rm -rf .run/kserve-bundle
	$(CAMSERVE) kserve-bundle --model-dir models/shapes --name shapes --out .run/kserve-bundle

# Performance against a plain prediction and the alternatives (about 30 minutes on 2 cores):
# writes bench/results/<date>-bench.json and .png. Not part of `make test`.
BENCH_INSTALLED := $(VENV)/.bench-installed
$(BENCH_INSTALLED): $(INSTALLED) requirements-bench.lock
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.lock
	touch $@

bench: SYSTEM_PACKAGES = $(JAVA_PACKAGE)
bench: system-deps $(BENCH_INSTALLED)
	$(PY) -m bench.run

# ResNet-50 on CUDA, explained against plain, in process and through TorchServe (a few minutes
# on one data-centre GPU): writes bench/results/<date>-gpu.json. Without CUDA it exits 2 and
# says why (docs/performance.md).
bench-gpu: SYSTEM_PACKAGES = $(JAVA_PACKAGE)
bench-gpu: system-deps $(INSTALLED)
	$(PY) -m bench.gpu

clean:
	rm -rf .run model_store/*.mar
