"""--train_text_encoder: the DreamBooth trainer adapts the CLIP text encoder's attention (q/k/v/out_proj) beside
the UNet, at --text_encoder_lr; the adapter file holds both parts and every reader loads them (load_pipeline,
sample, the evaluators' apply_adapter, exact resume; on two processes: test_two_processes.py), adapter_batch refuses them, and the LoRA exports carry the
text encoder as kohya `lora_te_*` and diffusers `text_encoder.*` keys that stock diffusers loads exactly."""
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from trainer_helpers import TINY, fails, stop_and_resume, train
from user_errors import refused

from ether_diffusion import AdapterConfig, inject_adapters, load_adapter, save_adapter
from ether_diffusion.adapter_file import ADAPTER_FILE, TEXT_ENCODER_PREFIX, TEXT_ENCODER_TARGETS_KEY
from ether_diffusion.adapters import (TEXT_ENCODER_TARGETS, adapter_config_of, adapter_modules, adapter_parameters,
                                      base_layer_of, text_encoder_config)
from ether_diffusion.adapters.methods import METHODS
from ether_diffusion.export import EXPORT_FILE_NAMES, MODEL_CARD, export_lora, export_merged
from ether_diffusion.pipelines import apply_adapter, load_pipeline
from ether_diffusion.sample import main as sample_main
from ether_diffusion.toy import world
from ether_diffusion.trainers import dreambooth

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, STOP_AT = 4, 2
LR, TEXT_ENCODER_LR = 6e-3, 2e-2
PROMPT = "a photo of qwe toy"
KOHYA_KEY = re.compile(r"^lora_(unet|te)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return world.write_subject(tmp_path_factory.mktemp("subject"), world.DEMO_SUBJECT)


def common_args(subject, *extra):
    return ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", subject, "--instance_prompt", PROMPT,
            "--resolution", 32, "--train_batch_size", 1, "--report_to", "none", "--num_validation_images", 1,
            "--validation_inference_steps", 2, *extra]


@pytest.fixture(scope="module")
def runs(subject, tmp_path_factory):
    """(full run, resumed run, the full run's log lines): ETHER+ n=2 on the UNet and the text encoder, 4 steps of
    2 accumulated batches (5 photos: the data order crosses an epoch), a checkpoint every 2 steps; the resumed run
    restarts from the full run's checkpoint-2."""
    common = common_args(subject, "--train_text_encoder", "--method", "ether+", "--n_blocks", 2,
                         "--learning_rate", LR, "--text_encoder_lr", TEXT_ENCODER_LR, "--gradient_accumulation_steps", 2,
                         "--max_train_steps", STEPS, "--checkpointing_steps", 2, "--seed", 3, "--export_lora", "kohya")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("ether_diffusion.training")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        full, resumed = stop_and_resume(dreambooth, common, tmp_path_factory.mktemp("runs"), stop_at=STOP_AT, run=train)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return full, resumed, messages


@pytest.fixture(scope="module")
def adapter(runs):
    return runs[0] / ADAPTER_FILE


def token_ids(pipe, prompt=PROMPT):
    return pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          return_tensors="pt").input_ids


@torch.no_grad()
def text_output(pipe):
    return pipe.text_encoder(token_ids(pipe))[0]


@torch.no_grad()
def unet_output(pipe, unet_inputs):
    return pipe.unet(*unet_inputs).sample


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def without_text_encoder(adapter, path):
    """A copy of `adapter` with its UNet part only, as a run without --train_text_encoder writes it."""
    with safe_open(str(adapter), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith(TEXT_ENCODER_PREFIX)}
    del meta[TEXT_ENCODER_TARGETS_KEY]
    meta["shapes"] = json.dumps({k: list(v.shape) for k, v in state.items()})
    save_file(state, str(path), metadata=meta)
    return path


# --------------------------------------------------------------------------------------- training
def test_training_changes_the_text_encoder_and_nothing_but_its_adapter(adapter, runs):
    full = runs[0]
    state = load_file(str(adapter))
    text_keys = [k for k in state if k.startswith(TEXT_ENCODER_PREFIX)]
    # every attention projection of every layer, and no frozen weight
    layers = {k[len(TEXT_ENCODER_PREFIX):].rpartition(".")[0] for k in text_keys}
    assert {name.rpartition(".")[2] for name in layers} == set(TEXT_ENCODER_TARGETS) and len(layers) == 2 * 4
    assert not any("base_layer" in k for k in state)
    # the optimizer holds the UNet's and the text encoder's adapter tensors, nothing else
    optimizer = torch.load(full / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    unet_group, text_group = optimizer["param_groups"]
    assert len(text_group["params"]) == len(text_keys) and len(unet_group["params"]) == len(state) - len(text_keys)

    base, adapted = load_pipeline(TINY), load_pipeline(TINY, adapter=adapter)
    assert relative_error(text_output(adapted), text_output(base)) > 1e-3
    frozen = dict(base.text_encoder.named_modules())
    for name, module in adapter_modules(adapted.text_encoder):
        assert torch.equal(base_layer_of(module).weight, frozen[name].weight), name


def test_text_encoder_lr_is_the_text_encoders_param_group_lr(runs):
    optimizer = torch.load(runs[0] / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == [LR, TEXT_ENCODER_LR]
    assert optimizer["param_groups"][1]["weight_decay"] == 0.0  # ETHER+: no decay, as for the UNet's


def test_resume_is_bit_exact_with_the_text_encoder(runs):
    full, resumed, _ = runs
    a, b = load_file(str(full / ADAPTER_FILE)), load_file(str(resumed / ADAPTER_FILE))
    assert a.keys() == b.keys() and any(k.startswith(TEXT_ENCODER_PREFIX) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(full / f"checkpoint-{STOP_AT}" / ADAPTER_FILE))
    moved = [k for k in a if k.startswith(TEXT_ENCODER_PREFIX) and k.endswith(".ether_v")]
    assert moved and all(not torch.equal(a[k], start[k]) for k in moved)  # the resumed steps trained the text encoder
    opt_a, opt_b = (torch.load(run / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True) for run in (full, resumed))
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        assert all(torch.equal(value, opt_b["state"][i][key]) for key, value in state.items()), i


def test_first_log_lines_and_model_card_name_the_text_encoder(runs, adapter):
    full, _, messages = runs
    lines = [m for m in messages if "Text encoder" in m or "text-encoder" in m]
    assert any(f"targets = {','.join(TEXT_ENCODER_TARGETS)}" in m and f"learning rate = {TEXT_ENCODER_LR:g}" in m
               for m in lines)
    count = sum(t.numel() for k, t in load_file(str(adapter)).items() if k.startswith(TEXT_ENCODER_PREFIX))
    assert f"  Trainable text-encoder adapter parameters = {count:,}" in messages
    card = (full / MODEL_CARD).read_text()
    assert f"the text encoder was trained too: ETHER+ ({count:,} trainable parameters) on its q_proj" in card


# --------------------------------------------------------------------------------------- readers
def test_load_pipeline_loads_and_merges_the_text_encoder(adapter):
    pipe = load_pipeline(TINY, adapter=adapter)
    assert adapter_config_of(pipe.text_encoder).target_modules == list(TEXT_ENCODER_TARGETS)
    merged = load_pipeline(TINY, adapter=adapter, merge=True)
    assert not adapter_modules(merged.text_encoder)
    assert relative_error(text_output(merged), text_output(pipe)) < 1e-5


def test_apply_adapter_switches_the_text_encoder_with_the_file(adapter, tmp_path):
    """The evaluator loads each subject's file into one pipeline: a file without a text-encoder part takes the
    last one's away."""
    unet_only = without_text_encoder(adapter, tmp_path / "unet-only.safetensors")
    base = text_output(load_pipeline(TINY))
    pipe = load_pipeline(TINY)
    apply_adapter(pipe, adapter)
    adapted = text_output(pipe)
    apply_adapter(pipe, unet_only)
    assert torch.equal(text_output(pipe), base)
    apply_adapter(pipe, adapter)
    assert torch.equal(text_output(pipe), adapted)


def test_sample_uses_the_text_encoder_part(adapter, tmp_path):
    unet_only = without_text_encoder(adapter, tmp_path / "unet-only.safetensors")
    grids = {}
    for name, path in (("both", adapter), ("unet", unet_only)):
        grids[name] = tmp_path / f"{name}.png"
        sample_main(["--model", TINY, "--adapter", str(path), "--prompt", PROMPT, "--num_images", "1",
                     "--num_inference_steps", "2", "--grid", str(grids[name])])
    both, unet = (np.asarray(Image.open(grids[n]), dtype=np.int16) for n in ("both", "unet"))
    assert np.abs(both - unet).mean() > 1  # the text encoder's adapter changes the picture


@pytest.mark.user_error("load_adapter(pipe.unet, file) of an adapter with a text-encoder part", tool="ether_diffusion")
def test_the_unet_alone_is_refused_a_file_with_a_text_encoder_part(adapter):
    with refused("holds a text-encoder adapter too"):
        load_adapter(load_pipeline(TINY).unet, adapter)


@pytest.mark.user_error("several adapters in one batch, one with a text-encoder part", tool="python -m ether_diffusion.sample")
def test_adapter_batch_refuses_a_text_encoder_part(adapter, tmp_path, capsys):
    unet_only = without_text_encoder(adapter, tmp_path / "unet-only.safetensors")
    line = fails(sample_main, ["--model", TINY, "--adapter", f"a={unet_only}", "--adapter", f"b={adapter}",
                               "--prompt", PROMPT, "--grid", tmp_path / "g.png"], capsys)
    assert line == (f"error: {adapter} holds a text-encoder adapter (--train_text_encoder): adapters in one batch adapt "
                    "the UNet only; load it alone (adapter=, --adapter PATH)")


# --------------------------------------------------------------------------------------- export
def test_kohya_file_names_every_text_encoder_layer_by_the_kohya_rule(runs):
    full = runs[0]
    path = full / EXPORT_FILE_NAMES["kohya"]  # the trainer's --export_lora kohya
    pipe = load_pipeline(TINY)
    linears = {"unet": {n.replace(".", "_"): n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)},
               # SD-1's text encoder under `text_model.` (transformers >= 5 flattens that level away)
               "te": {f"text_model.{n}".replace(".", "_"): n for n, m in pipe.text_encoder.named_modules()
                      if isinstance(m, torch.nn.Linear)}}
    layers = {"unet": {}, "te": {}}
    for key, tensor in load_file(str(path)).items():
        match = KOHYA_KEY.match(key)
        assert match, f"not a kohya key: {key}"
        part, name, what = match.groups()
        assert name in linears[part], f"{key} names no Linear layer"
        layers[part].setdefault(linears[part][name], {})[what] = tensor
    targets = [n for n, _ in pipe.text_encoder.named_modules() if n.endswith(TEXT_ENCODER_TARGETS)]
    assert sorted(layers["te"]) == sorted(targets) and len(targets) == 8 and layers["unet"]
    for name, tensors in layers["te"].items():
        linear = pipe.text_encoder.get_submodule(name)
        assert tensors["lora_down.weight"].shape == (8, linear.in_features)  # ETHER+ n=2: rank 4n, as the UNet's
        assert tensors["lora_up.weight"].shape == (linear.out_features, 8) and tensors["alpha"].item() == 8
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in load_file(str(path)))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_stock_diffusers_loads_the_export_and_computes_the_merged_model(adapter, fmt, tmp_path, unet_inputs):
    merged = load_pipeline(TINY, adapter=adapter, merge=True)
    assert relative_error(text_output(merged), text_output(load_pipeline(TINY))) > 1e-3  # a real update to export
    path = export_lora(adapter, fmt, tmp_path / "lora.safetensors", dtype=torch.float32)
    if fmt == "diffusers":
        keys = load_file(str(path))
        assert sum(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys) == 2 * 8
        assert all(re.fullmatch(r"(unet|text_encoder)\.[\w.]+\.lora_[AB]\.weight", k) for k in keys)
    pipe = load_pipeline(TINY)
    pipe.load_lora_weights(str(path))  # stock diffusers, nothing of ours
    assert relative_error(text_output(pipe), text_output(merged)) < 1e-5
    assert relative_error(unet_output(pipe, unet_inputs), unet_output(merged, unet_inputs)) < 1e-5


def test_merged_export_merges_the_text_encoder(adapter, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = export_merged(adapter, tmp_path / "merged")
    torch.testing.assert_close(text_output(StableDiffusionPipeline.from_pretrained(out)),
                               text_output(load_pipeline(TINY, adapter=adapter, merge=True)))


# --------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_on_the_text_encoder_saves_loads_merges_and_exports(name, tmp_path):
    """Without training (the run above is ETHER+'s): each method's adapter on both parts, moved away from its
    start, read back by load_pipeline, merged, and exported exactly where it is low rank."""
    pipe = load_pipeline(TINY)
    cfg = AdapterConfig(method=name, n_blocks=2, rank=2)
    torch.manual_seed(0)
    inject_adapters(pipe.unet, cfg)
    inject_adapters(pipe.text_encoder, text_encoder_config(cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(pipe.unet) + adapter_parameters(pipe.text_encoder):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    want = text_output(pipe)
    path = save_adapter(pipe.unet, tmp_path / ADAPTER_FILE, extra_metadata={"base_model": TINY},
                        text_encoder=pipe.text_encoder)
    assert torch.equal(text_output(load_pipeline(TINY, adapter=path)), want)
    merged = text_output(load_pipeline(TINY, adapter=path, merge=True))
    assert relative_error(merged, want) < 1e-5 and relative_error(merged, text_output(load_pipeline(TINY))) > 1e-3
    if METHODS[name].update_rank is None:
        return  # full rank: the LoRA export is refused as for the UNet (tests/test_export.py)
    lora = load_pipeline(TINY)
    lora.load_lora_weights(str(export_lora(path, "diffusers", tmp_path / "lora.safetensors", dtype=torch.float32)))
    assert relative_error(text_output(lora), merged) < 1e-5


# --------------------------------------------------------------------------------------- flags
@pytest.mark.user_error("--text_encoder_lr without --train_text_encoder", tool="train_dreambooth.py")
def test_text_encoder_lr_needs_train_text_encoder(subject, tmp_path, capsys):
    line = fails(dreambooth.main, common_args(subject, "--text_encoder_lr", 1e-4, "--output_dir", tmp_path), capsys)
    assert line == ("error: --text_encoder_lr is the learning rate of --train_text_encoder: add that flag, or leave "
                    "--text_encoder_lr out")


@pytest.mark.user_error("--pre_compute_text_embeddings with --train_text_encoder", tool="train_dreambooth.py")
def test_pre_computed_embeddings_cannot_train_the_text_encoder(subject, tmp_path, capsys):
    line = fails(dreambooth.main, common_args(subject, "--train_text_encoder", "--pre_compute_text_embeddings",
                                              "--output_dir", tmp_path), capsys)
    assert "--pre_compute_text_embeddings encodes the prompts once with a frozen text encoder" in line


@pytest.mark.user_error("resuming a --train_text_encoder checkpoint without the flag", tool="train_dreambooth.py")
def test_resuming_without_the_text_encoder_is_an_error(runs, subject, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(runs[0] / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}")
    line = fails(dreambooth.main, common_args(subject, "--method", "ether+", "--n_blocks", 2, "--output_dir", out,
                                              "--resume_from_checkpoint", "latest"), capsys)
    assert line.endswith(f"checkpoint-{STEPS} was trained with --train_text_encoder but this run does not; resume "
                         "with the same setting or use another --output_dir")


def test_gradient_checkpointing_still_trains_the_text_encoder(subject, tmp_path):
    """--gradient_checkpointing checkpoints the text encoder's layers too: its adapters still learn."""
    train(dreambooth, *common_args(subject, "--train_text_encoder", "--gradient_checkpointing", "--max_train_steps", 1,
                                   "--output_dir", tmp_path, "--seed", 0))
    pipe = load_pipeline(TINY, adapter=tmp_path / ADAPTER_FILE)
    assert relative_error(text_output(pipe), text_output(load_pipeline(TINY))) > 1e-4


@pytest.mark.user_error("an adapter file whose text_encoder_target_modules header is damaged", tool="ether_diffusion")
def test_a_damaged_text_encoder_header_is_named(adapter, tmp_path):
    with safe_open(str(adapter), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    damaged = tmp_path / "damaged.safetensors"
    save_file(state, str(damaged), metadata={**meta, TEXT_ENCODER_TARGETS_KEY: "[q_proj"})
    with refused(f"{damaged}: the adapter header has {TEXT_ENCODER_TARGETS_KEY}='\\[q_proj', not a JSON list"):
        load_pipeline(TINY, adapter=damaged)
