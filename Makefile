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
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,serve]'
	touch $(STAMP)

setup: $(STAMP)

DEMO := runs/demo
demo: $(STAMP)
	$(BIN)/saq-deploy env
	# 1. calibrate W8A8 with --method auto: minmax, mse, BRECQ and SA-PTQ (MOTA) on 10-step DPM-Solver-2
	#    trajectories, ranked by how close their DDIM-10 samples come to FP32's; the best is kept
	#    (fewer seeds/iterations than the recipe, for speed; report in w8a8/comparison/report.md)
	rm -rf $(DEMO)/w8a8 $(DEMO)/.w8a8.partial $(DEMO)/.w8a8.compare
	$(BIN)/saq-deploy calibrate --recipe calibration/digits_w8a8_sa-ptq.toml --num-samples 16 --iters 50 --method auto --eval-n 64 -o $(DEMO)/w8a8
	# 2. export Q/DQ ONNX (TensorRT + ONNX Runtime placements) and build the ONNX Runtime engine
	$(BIN)/saq-deploy export $(DEMO)/w8a8
	$(BIN)/saq-deploy lint $(DEMO)/w8a8/onnx/tensorrt/model.onnx --target tensorrt
	$(BIN)/saq-deploy build-engine $(DEMO)/w8a8 --backend onnxruntime
	# 3. parity gate (engine vs fake-quant) and, only if it passes, quality vs FP32
	$(BIN)/saq-deploy validate $(DEMO)/w8a8 --backend onnxruntime --quality-n 200
	# 4. sample through the engine
	$(BIN)/saq-deploy sample --engine $(DEMO)/w8a8/engine --sampler dpmpp-2m --steps 10 -n 64 -o $(DEMO)/grid-engine.png
	$(BIN)/saq-deploy bench $(DEMO)/w8a8 --backend onnxruntime --batch 8 --calls 20
	@echo
	$(BIN)/saq-deploy summary $(DEMO)/w8a8 --backend onnxruntime
	@echo "Wrote $(DEMO)/w8a8/ (artifact, comparison/report.md + comparison.png, onnx/, engine/, validation/onnxruntime/report.md + direction-error.png), $(DEMO)/grid-engine.png"

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# ruff (config in pyproject.toml); part of `make test`, so CI runs it
lint: $(STAMP)
	$(BIN)/ruff check .

# Re-train the committed artifacts (not needed for demo/test).
reference: $(STAMP)
	$(BIN)/saq-deploy train-reference
classifier: $(STAMP)
	$(BIN)/saq-deploy train-classifier

clean:
	rm -rf $(VENV) runs .pytest_cache
