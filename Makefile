# Two commands do all the set-up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch (a local wheel here); override on a GPU machine, e.g. TORCH=torch
TORCH  ?= torch==2.13.0

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the CLIP BPE vocabulary ships in open-clip-torch; --no-deps keeps its torchvision out
	$(BIN)/python -m pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffsr demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .demo
