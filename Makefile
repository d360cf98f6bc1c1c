# make setup: .venv from nothing; make test: the test suite (offline); make demo: ETHER+ on the toy world's SD,
# then the toy judge says what the final grid shows.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo demo-s2i bench user-errors-table clean reproduce-toy reproduce-toy-dreambooth reproduce-toy-s2i

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# The tests run in TEST_WORKERS processes (pytest-xdist), a test file each, one torch thread per process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile

# --overwrite_output_dir: a second `make demo` replaces the last demo-output (its class images are kept and reused).
demo: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train_dreambooth.py --config configs/dreambooth/demo.yaml --overwrite_output_dir
	$(PY) -m ether_diffusion.toy.judge --grid demo-output/samples/final.png --config configs/dreambooth/demo.yaml \
		--subject star_toy

# The S2I demo on the toy world: ETHER+ and the signal encoder, then the toy segmenter on the final grid.
demo-s2i: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train_controlnet_s2i.py --config configs/s2i/demo.yaml --overwrite_output_dir
	$(PY) -m ether_diffusion.toy.judge --s2i_grid demo-output/s2i/samples/final.png

user-errors-table: setup
	USER_ERRORS_TABLE=docs/user_errors.md $(PY) -m pytest tests -m user_error -q -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PY) benchmarks/adapter_overhead.py

# The paper's Table 2 and Table 3 on the toy world (docs/reproduce_toy.md): 4 toy subjects x {ETHER, ETHER+, LoRA,
# OFT} and S2I on the toy label maps (encoder-only, ETHER, ETHER+, OFT), judged by the toy judge (CLIP/DINO: its
# open_clip model; mIoU/Acc: its UperNet; LPIPS and FID: random stand-ins, not meaningful). Smaller runs:
#   make reproduce-toy-dreambooth TOY_SUBJECTS=star_toy,heart_toy TOY_STEPS=300 TOY_SELECT_EVERY=100
# Learning-rate robustness: TOY_ARGS="--lr_multipliers 0.1,1,10,100" (a report row per method and multiple).
TOY_OUT ?= outputs/reproduce-toy
TOY_PROCESSES ?= 2
TOY_SUBJECTS ?= star_toy,heart_toy,stripe_toy,cyclops_toy
TOY_METHODS ?= ether,ether+,lora,oft
TOY_S2I_METHODS ?= none,ether,ether+,oft
TOY_STEPS ?=
TOY_SELECT_EVERY ?= 200
TOY_ARGS ?=
TOY_JUDGE := ether_diffusion/toy/weights/judge
TOY_LAUNCH = ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone \
	--nproc_per_node $(TOY_PROCESSES) -m evaluate.reproduce

$(TOY_OUT)/data/.written: setup
	$(PY) -c "from ether_diffusion.toy import world; world.write_subjects('$(TOY_OUT)/data/subjects'); \
		world.write_ade20k('$(TOY_OUT)/data', n_train=512, n_val=64)"
	$(PY) -m evaluate.tiny_backbones $(TOY_OUT)/stand-ins
	touch $@

reproduce-toy-dreambooth: $(TOY_OUT)/data/.written
	$(TOY_LAUNCH) dreambooth --dataset $(TOY_OUT)/data/subjects --subjects $(TOY_SUBJECTS) \
		--config_dir configs/toy --methods $(TOY_METHODS) $(if $(TOY_STEPS),--max_train_steps $(TOY_STEPS)) \
		--select_every $(TOY_SELECT_EVERY) --output_dir $(TOY_OUT)/dreambooth $(TOY_ARGS) \
		--eval_args "--clip $(TOY_JUDGE) --dino $(TOY_JUDGE) --lpips_net $(TOY_OUT)/stand-ins/lpips \
			--lpips_resolution 64 --num_inference_steps 25 --images_per_prompt 4"

reproduce-toy-s2i: $(TOY_OUT)/data/.written
	$(TOY_LAUNCH) s2i --dataset $(TOY_OUT)/data/ADEChallengeData2016 --config_dir configs/toy \
		--caption_file $(TOY_OUT)/data/ADEChallengeData2016/metadata.jsonl \
		--methods $(TOY_S2I_METHODS) $(if $(TOY_STEPS),--max_train_steps $(TOY_STEPS)) \
		--select_every $(TOY_SELECT_EVERY) --select_maps 16 --output_dir $(TOY_OUT)/s2i $(TOY_ARGS) \
		--eval_args "--segmenter ether_diffusion/toy/weights/segmenter --inception $(TOY_OUT)/stand-ins/inception \
			--num_inference_steps 25"

reproduce-toy: reproduce-toy-dreambooth reproduce-toy-s2i

clean:
	rm -rf $(VENV) demo-output
