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

.PHONY: demo test lab bench batch install clean-demo study-loop

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name histo-unet --display-name "Histo-UNet (.venv)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m helpers.pipeline --workdir $(WORKDIR) --params data/params/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# make batch SLIDES=path/to/slides [MPP=0.5] [WORKDIR=runs/demo]: 07_infer_slide on every slide
batch: $(STAMP)
	$(PY) -m helpers.batch --slides $(SLIDES) --workdir $(WORKDIR) $(if $(MPP),--mpp $(MPP),)

# make study-loop [OUT=runs/study]: the annotation-loop study of 09 (uncertainty vs random fields; trains 10 models)
study-loop: $(STAMP)
	$(PY) -m benchmarks.study_annotation_loop --out $(or $(OUT),runs/study)

clean-demo:
	rm -rf $(WORKDIR)
