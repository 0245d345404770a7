# Set-up and the two entry points. Everything lands in a virtual environment (.venv).
#   make demo   generate with the small pydoc-trained model (trains it once, ~2 min) and print throughput
#   make test   run the test suite
# On a machine where `pip install torch==2.13.0` would pull a CUDA build you do not want, pass a
# CPU index: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test install clean

demo: $(VENV)/.installed
	$(VENV)/bin/flexlab demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# Keep an installed torch; otherwise install the pinned (CPU, on these machines) build first,
	# so that the loose "torch>=2.1" requirement below installs nothing more.
	$(VENV)/bin/python -c "import torch" 2>/dev/null || \
		$(VENV)/bin/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
