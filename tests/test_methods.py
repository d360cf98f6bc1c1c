"""Every entry of the method table, end to end on the tiny SD: DreamBooth training in-process, exact resume, the
model card, the LoRA export (or its refusal for full-rank methods), merging and the analysis. A method added to
`METHODS` without its parts fails here, not in a user's run."""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import TINY, fails, stop_and_resume, train

from ether_diffusion import load_adapter, merge_adapters
from ether_diffusion.adapter_file import ADAPTER_FILE, config_from_metadata, read_adapter_metadata
from ether_diffusion.adapters import adapter_modules
from ether_diffusion.adapters.methods import METHODS, method_of
from ether_diffusion.analysis import adapter_distances, layer_report
from ether_diffusion.errors import UserError
from ether_diffusion.export import EXPORT_FILE_NAMES, MODEL_CARD, export_lora
from ether_diffusion.pipelines import load_pipeline
from ether_diffusion.toy import world
from ether_diffusion.trainers import dreambooth

STEPS, STOP_AT = 6, 4


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return world.write_subject(tmp_path_factory.mktemp("subject"), world.DEMO_SUBJECT)


@pytest.fixture(scope="module")
def trained(subject, tmp_path_factory):
    """method name -> (method, full run, resumed run), each trained once. 6 steps at the method's own default
    rate and a setting of 2, with gradient accumulation over 2 batches of 1 (5 photos: the data order crosses
    an epoch), a linear schedule with warm-up, a checkpoint every 2 steps and at most 2 kept; the low-rank
    methods export a kohya file. The resumed run restarts from the full run's checkpoint-4."""
    cache = {}

    def runs_of(name):
        if name not in cache:
            method = METHODS[name]
            setting = "--n_blocks" if "n_blocks" in method.settings else "--rank"
            common = ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", subject,
                      "--instance_prompt", "a photo of qwe toy", "--resolution", 32, "--train_batch_size", 1,
                      "--gradient_accumulation_steps", 2, "--max_train_steps", STEPS, "--checkpointing_steps", 2,
                      "--checkpoints_total_limit", 2, "--lr_scheduler", "linear", "--lr_warmup_steps", 2,
                      "--method", name, setting, 2, "--seed", 3, "--report_to", "none",
                      "--num_validation_images", 1, "--validation_inference_steps", 2,
                      *(["--export_lora", "kohya"] if method.update_rank else [])]
            root = tmp_path_factory.mktemp(name.replace("+", "plus"))
            cache[name] = (method, *stop_and_resume(dreambooth, common, root, stop_at=STOP_AT, run=train))
        return cache[name]

    return runs_of


@pytest.fixture(params=list(METHODS))
def runs(request, trained):
    return trained(request.param)


@pytest.fixture(scope="module")
def base_unet(tiny_sd_path):
    return load_pipeline(TINY).unet


def read_log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def unet_output(unet, unet_inputs):
    with torch.no_grad():
        return unet(*unet_inputs).sample


def test_resume_gives_the_same_adapter(runs):
    method, full, resumed = runs
    a, b = load_file(str(full / ADAPTER_FILE)), load_file(str(resumed / ADAPTER_FILE))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    start = load_file(str(full / f"checkpoint-{STOP_AT}" / ADAPTER_FILE))
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 0, "the last steps changed nothing"
    logs, full_logs = (read_log(folder) for folder in (resumed, full))
    assert [d["step"] for d in logs] == list(range(1, STEPS + 1))
    assert [d["lr"] for d in logs] == [d["lr"] for d in full_logs]  # the schedule resumed in place
    assert logs[-1]["loss"] == pytest.approx(full_logs[-1]["loss"], abs=1e-6)


def test_checkpoints_are_pruned_to_the_limit(runs):
    _, full, _ = runs
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((full / "checkpoint-6" / "state.json").read_text())["global_step"] == 6


@pytest.mark.user_error("resuming a checkpoint with another --method", tool="train_dreambooth.py")
def test_resuming_with_another_method_is_an_error(trained, subject, tmp_path, capsys):
    _, full, _ = trained("ether+")
    out = tmp_path / "o"
    shutil.copytree(full / "checkpoint-6", out / "checkpoint-6")
    line = fails(dreambooth.main, ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", subject,
                                   "--instance_prompt", "a photo of qwe toy", "--output_dir", out, "--resolution", 32,
                                   "--method", "oft", "--n_blocks", 2, "--resume_from_checkpoint", "latest"], capsys)
    assert "checkpoint-6 was trained with method='ether+' but this run asks for method='oft'" in line


def test_model_card_names_the_method_and_its_shape(runs):
    method, full, _ = runs
    card = (full / MODEL_CARD).read_text()
    cfg = config_from_metadata(read_adapter_metadata(full / ADAPTER_FILE))
    assert f"# {method.title} adapter for {TINY}" in card
    assert f"{method.title} ({method.shape(cfg)}, " in card


def test_merge_computes_what_the_adapter_computes(runs, base_unet, unet_inputs):
    _, full, _ = runs
    unet = copy.deepcopy(base_unet)
    load_adapter(unet, full / ADAPTER_FILE)
    adapted = unet_output(unet, unet_inputs)
    assert not torch.allclose(adapted, unet_output(base_unet, unet_inputs))  # the adapter does something
    merge_adapters(unet)
    assert not adapter_modules(unet)
    assert torch.allclose(unet_output(unet, unet_inputs), adapted, rtol=1e-4, atol=1e-5)


def test_the_lora_export_is_exact_or_refused(runs, unet_inputs):
    method, full, _ = runs
    if method.update_rank is None:  # full rank: no LoRA file, and the trainer refused --export_lora up front
        assert not (full / EXPORT_FILE_NAMES["kohya"]).exists()
        with pytest.raises(UserError, match=f"{method.title} changes every weight at full rank"):
            export_lora(full / ADAPTER_FILE, "kohya", full / "x.safetensors")
        return
    lora = full / EXPORT_FILE_NAMES["kohya"]
    cfg = config_from_metadata(read_adapter_metadata(full / ADAPTER_FILE))
    downs = [t for k, t in load_file(str(lora)).items() if k.endswith("lora_down.weight")]
    assert downs and {t.shape[0] for t in downs} == {method.update_rank(cfg)} and downs[0].dtype == torch.float16
    assert f"<lora:{lora.stem}:1>" in (full / MODEL_CARD).read_text()  # the card says how A1111 loads it
    merged = load_pipeline(TINY, adapter=full / ADAPTER_FILE, merge=True).unet
    pipe = load_pipeline(TINY)
    pipe.load_lora_weights(str(lora))  # stock diffusers, nothing of ours
    want = unet_output(merged, unet_inputs)
    assert ((unet_output(pipe.unet, unet_inputs) - want).norm() / want.norm()).item() < 2e-3  # an fp16 file


def test_analysis_reads_every_layer(runs, base_unet):
    method, full, _ = runs
    unet = copy.deepcopy(base_unet)
    load_adapter(unet, full / ADAPTER_FILE)
    rows = layer_report(unet, energy=False)
    assert rows and all(r["method"] == method.name and r["weight"] > 0 for r in rows)
    multiplicative = bool(method.transforms(adapter_modules(unet)[0][1]))
    assert all((r["transform"] is not None) == multiplicative for r in rows)
    assert all(method_of(m) is method for _, m in adapter_modules(unet))
    assert ("transform_distance" in adapter_distances(unet)) == multiplicative
