# make setup: .venv from nothing; make test: the test suite (offline); make demo: ETHER+ on the toy world's SD,
# then the toy judge says what the final grid shows.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo demo-s2i bench user-errors-table clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest tests

demo: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train_dreambooth.py --config configs/dreambooth/demo.yaml
	$(PY) -m ether_diffusion.toy.judge --grid demo-output/samples/final.png --config configs/dreambooth/demo.yaml \
		--subject star_toy

demo-s2i: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train_controlnet_s2i.py --config configs/s2i/demo.yaml

user-errors-table: setup
	USER_ERRORS_TABLE=docs/user_errors.md $(PY) -m pytest tests -m user_error -q

bench: setup
	$(PY) benchmarks/adapter_overhead.py

clean:
	rm -rf $(VENV) demo-output
