# Two commands do all the set-up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch (a local wheel here); override on a GPU machine, e.g. TORCH=torch
TORCH  ?= torch==2.13.0

.PHONY: demo test typecheck clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the CLIP BPE vocabulary ships in open-clip-torch; --no-deps keeps its torchvision out
	$(BIN)/python -m pip install --quiet --no-deps open-clip-torch==3.3.0
	# type stubs of TensorRT 10.13, for mypy; --no-deps: their dependency is the real TensorRT, which
	# cannot be installed here. They come as plain tensorrt/ folders without py.typed, which mypy
	# skips, so mypy reads copies from $(VENV)/typing (pyproject's mypy_path), with the stub
	# generator's three slips mended: `in` as a parameter name, a parameter without a default
	# after defaulted ones, and an import of tensorrt_libs (a runtime-only package).
	$(BIN)/python -m pip install --quiet --no-deps tensorrt-stubs==10.13.0.35.1
	rm -rf $(VENV)/typing && mkdir -p $(VENV)/typing
	site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
		cp -r "$$site/tensorrt" "$$site/tensorrt_bindings" $(VENV)/typing/
	sed -i -e 's/\([(,] \)in: /\1in_: /g' -e 's/channel_axis: int) -> IScaleLayer/channel_axis: int = ...) -> IScaleLayer/' \
		$(VENV)/typing/tensorrt_bindings/tensorrt.pyi
	sed -i -e '/^import tensorrt_libs/d' -e "s/'tensorrt_libs', //" $(VENV)/typing/tensorrt/__init__.pyi
	# mypy cannot follow setuptools' editable import hook (the top-level folders are installed as
	# diffsr.<folder>), so it reads the package through links laid out as installed
	mkdir -p $(VENV)/typing/diffsr
	for d in export runtime calib triton_models app; do ln -sfn "$(CURDIR)/$$d" $(VENV)/typing/diffsr/$$d; done
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffsr demo

test: typecheck
	$(BIN)/python -m pytest

# mypy, strict, on the TensorRT and CUDA code (the modules are listed in pyproject.toml)
typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo
