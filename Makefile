# Histo-UNet: two commands do all the set-up.
#   make demo   installs into .venv, makes the demo slide and runs every notebook on it
#   make test   installs into .venv and runs the tests (what CI runs)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= runs/demo
export SM_FRAMEWORK := tf.keras
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONHASHSEED := 0
export NO_ALBUMENTATIONS_UPDATE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: demo test lab bench bench-real batch batch-tiles study-loop install clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# byte-compile the installed packages once: where PYTHONDONTWRITEBYTECODE is set (as on the CI image)
	@# pip leaves no .pyc and every kernel re-compiles TensorFlow, matplotlib... (imports 7.6 s -> 3.7 s)
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	@touch $(STAMP)

# the project's Jupyter kernel "Histo-UNet (.venv)" (quiet TensorFlow start-up); rewritten
# whenever helpers/runner.py changes, so an existing .venv gets it too
KERNEL := $(VENV)/share/jupyter/kernels/histo-unet/kernel.json
$(KERNEL): $(STAMP) helpers/runner.py
	$(PY) -m helpers.runner install-kernel >/dev/null

install: $(STAMP) $(KERNEL)

demo: $(STAMP) $(KERNEL)
	$(PY) -m helpers.pipeline --workdir $(WORKDIR) --params data/params/demo --overwrite

test: $(STAMP) $(KERNEL)
	$(PY) -m pytest -q

# make lab: JupyterLab on the notebooks (kernel "Histo-UNet (.venv)"); after make demo, open 03_refine_labels.
# jupyter/ (project-local settings: no news pop-up) is added to JUPYTER_CONFIG_PATH; ~/.jupyter is left as it is.
lab: $(STAMP) $(KERNEL)
	@echo "Open 03_refine_labels.ipynb and Run All: it reuses $(WORKDIR) and shows the label browser."
	JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter$(if $(JUPYTER_CONFIG_PATH),:$(JUPYTER_CONFIG_PATH),)" \
		$(VENV)/bin/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 \
		--LabApp.default_url=/lab/tree/03_refine_labels.ipynb

# make bench: every benchmark, then the targets (P1, P3, P7, variants) met / not met -> benchmarks/results/bench.csv
bench: $(STAMP)
	WORKDIR=$(WORKDIR) $(PY) -m benchmarks.run_all

# make bench-real [DATA=folder]: issue 11's real-data benchmark (chain 01-07 per source, held-out IoU);
# DATA holds one sub-folder of image + mask pairs per source, each described by a YAML
# (<source>/bench_real.yaml or benchmarks/real/<source>.yaml). Table -> benchmarks/results/real.csv
# SEEDS="0 1": several annotator seeds (mean +- sd per source; one draw is not a measurement here)
DATA ?= ../shared/data/real
SEEDS ?= 0
bench-real: $(STAMP)
	$(PY) -m benchmarks.bench_real --data $(DATA) --seeds $(SEEDS)

# make batch SLIDES=path/to/slides [WORKERS=n] [SCHEDULER=tcp://host:8786] [MPP=0.5] [PARAMS=p.yaml] [WORKDIR=runs/demo]
#   07_infer_slide on every slide, one Dask task per slide (LocalCluster by default; WORKERS=0: no Dask)
COHORT_OPTS = $(if $(WORKERS),--workers $(WORKERS),) $(if $(SCHEDULER),--scheduler $(SCHEDULER),) \
	$(if $(MPP),--mpp $(MPP),) $(if $(PARAMS),--params $(PARAMS),)
batch: $(STAMP)
	$(PY) -m helpers.batch --slides $(SLIDES) --workdir $(WORKDIR) $(COHORT_OPTS)

# make batch-tiles SLIDES=dir [ANNOTATIONS=dir] [WORKERS=n] [SCHEDULER=...]: 01_export_tiles per slide, gathered into tiles/
batch-tiles: $(STAMP)
	$(PY) -m helpers.batch --step 01 --slides $(SLIDES) --workdir $(WORKDIR) $(COHORT_OPTS) \
		$(if $(ANNOTATIONS),--annotations $(ANNOTATIONS),)

# make study-loop [OUT=runs/study]: the annotation-loop study of 09 (uncertainty vs random fields; trains 10 models)
study-loop: $(STAMP)
	$(PY) -m benchmarks.study_annotation_loop --out $(or $(OUT),runs/study)

clean-demo:
	rm -rf $(WORKDIR)
