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

DEMO := runs/demo
demo: $(STAMP)
	$(BIN)/saq-deploy env
	$(BIN)/saq-deploy sample --model builtin:digits --sampler dpmpp-2m --steps 10 --cfg 1.5 --seed 0 -n 64 -o $(DEMO)/grid.png
	# W8A8 SA-PTQ (MOTA) on 10-step DPM-Solver-2 trajectories; fewer seeds/iterations than the recipe, for speed
	rm -rf $(DEMO)/w8a8 $(DEMO)/.w8a8.partial
	$(BIN)/saq-deploy calibrate --recipe calibration/digits_w8a8_sa-ptq.toml --num-samples 16 --iters 50 -o $(DEMO)/w8a8
	$(BIN)/saq-deploy sample --artifact $(DEMO)/w8a8 --sampler ddim --spacing quadratic --steps 10 -n 64 -o $(DEMO)/grid-w8a8.png
	@echo "== FP32, DDIM 10 steps (quadratic grid), 200 samples"
	$(BIN)/saq-deploy evaluate --model builtin:digits --sampler ddim --spacing quadratic --steps 10 -n 200 --seed 1000 -o $(DEMO)/eval-fp32.json
	@echo "== W8A8 SA-PTQ fake-quant, same sampler and seeds"
	$(BIN)/saq-deploy evaluate --artifact $(DEMO)/w8a8 --sampler ddim --spacing quadratic --steps 10 -n 200 --seed 1000 -o $(DEMO)/eval-w8a8.json
	@echo "Wrote $(DEMO)/grid.png, $(DEMO)/grid-w8a8.png, $(DEMO)/w8a8/ (artifact + report.md), $(DEMO)/eval-*.json"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Re-train the committed artifacts (not needed for demo/test).
reference: $(STAMP)
	$(BIN)/saq-deploy train-reference
classifier: $(STAMP)
	$(BIN)/saq-deploy train-classifier

clean:
	rm -rf $(VENV) runs .pytest_cache
