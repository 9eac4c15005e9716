# Two commands set up a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test setup clean reference classifier lint

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, from the local CPU wheel; the constraints file keeps later installs from replacing it
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/saq-deploy env
	$(BIN)/saq-deploy sample --model builtin:digits --sampler dpmpp-2m --steps 10 --cfg 1.5 --seed 0 -n 64 -o runs/demo/grid.png
	@echo "Wrote runs/demo/grid.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Re-train the committed artifacts (not needed for demo/test).
reference: $(STAMP)
	$(BIN)/saq-deploy train-reference
classifier: $(STAMP)
	$(BIN)/saq-deploy train-classifier

clean:
	rm -rf $(VENV) runs .pytest_cache
