"""ether_diffusion.export: every low-rank adapter as an exact LoRA that stock diffusers loads (kohya and
diffusers formats), the kohya naming rule, ranks and alphas, OFT/Naive refusal, the merged folder, the model
card, the trainers' refusal of --export_lora for full-rank methods (their export: test_methods.py), and exported files used where adapter files go (sampling, evaluation)."""
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from ether_diffusion.trainers import dreambooth as dreambooth_trainer, s2i as s2i_trainer
from trainer_helpers import TINY, fails

from ether_diffusion import AdapterConfig, inject_adapters, save_adapter
from ether_diffusion.adapter_file import read_safetensors_metadata
from ether_diffusion.adapters import adapter_parameters
from ether_diffusion.errors import UserError
from ether_diffusion.export import EXPORT_FILE_NAMES, export, export_lora, export_merged, finish_run
from ether_diffusion.export import main as export_main
from ether_diffusion.pipelines import apply_adapter, load_pipeline
from evaluate import dreambooth
from evaluate.protocol import PROMPTS_FILE

# The base models the exports are checked on; any SD-1.x-shaped diffusers model works (the lead adds the toy SD).
MODELS = [TINY]
# (method, n_blocks, LoRA/HRA rank) -> the rank the export must have: n for ETHER, 4n for ETHER+, r for LoRA/HRA.
CASES = {"ether-n1": ("ether", 1, 4, 1), "ether-n4": ("ether", 4, 4, 4), "ether+-n1": ("ether+", 1, 4, 4),
         "ether+-n4": ("ether+", 4, 4, 16), "hra-r4": ("hra", 1, 4, 4), "lora-r4": ("lora", 1, 4, 4)}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
KOHYA_KEY = re.compile(r"^lora_unet_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
PROMPT = "a photo of qwe toy"


def unet_inputs(unet):
    """A noisy latent batch, two timesteps and text states shaped for `unet` (any SD-1.x-shaped model)."""
    g = torch.Generator().manual_seed(0)
    size, channels = unet.config.sample_size, unet.config.in_channels
    return (torch.randn(2, channels, size, size, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 7, unet.config.cross_attention_dim, generator=g))


@torch.no_grad()
def unet_output(pipe):
    return pipe.unet(*unet_inputs(pipe.unet)).sample


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def write_adapter(model, method, n_blocks, rank, path, seed=0):
    """An adapter as training leaves one: every parameter moved from its start (ETHER+ and HRA start at the
    identity, LoRA with B = 0), so each layer has a real update to export."""
    pipe = load_pipeline(model)
    torch.manual_seed(seed)  # the methods' own initialisation draws from the global generator
    inject_adapters(pipe.unet, AdapterConfig(method=method, n_blocks=n_blocks, rank=rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(pipe.unet):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return save_adapter(pipe.unet, path, extra_metadata={"base_model": model, "instance_prompt": PROMPT, "steps": 7})


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    """{case: (adapter file, UNet output of the merged model)}."""
    root = tmp_path_factory.mktemp("adapters")
    found = {}
    for i, (case, (method, n, rank, _)) in enumerate(CASES.items()):
        path = write_adapter(model, method, n, rank, root / case / "adapter.safetensors", seed=i)
        found[case] = path, unet_output(load_pipeline(model, adapter=path, merge=True))
    return found


# --------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("case", CASES)
def test_stock_diffusers_loads_the_export_and_computes_the_merged_model(model, adapters, case, fmt, dtype, tmp_path):
    adapter, merged = adapters[case]
    path = export_lora(adapter, fmt, tmp_path / "lora.safetensors", dtype=dtype)
    pipe = load_pipeline(model)
    pipe.load_lora_weights(str(path))  # stock diffusers, nothing of ours
    error = relative_error(unet_output(pipe), merged)
    print(f"{model} {case} {fmt} {str(dtype)[6:]}: relative error {error:.2e}")
    assert error < TOLERANCE[dtype]
    assert all(t.dtype == dtype for t in load_file(str(path)).values())


def test_the_export_is_a_real_update(model, adapters):
    """The comparison above would pass for an adapter that changes nothing: each merged model differs from the base."""
    base = unet_output(load_pipeline(model))
    for case, (_, merged) in adapters.items():
        assert relative_error(base, merged) > 1e-2, case


# --------------------------------------------------------------------------------------- the kohya file
def kohya_layers(path, unet):
    """{module name: {"lora_down.weight": ..., "lora_up.weight": ..., "alpha": ...}}, every key resolved by the
    kohya rule itself: `lora_unet_` + the module's path with dots as underscores (so `to_out.0` is `to_out_0`),
    looked up among the UNet's own Linear layers."""
    by_rule = {name.replace(".", "_"): name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(by_rule) == sum(isinstance(m, torch.nn.Linear) for m in unet.modules())  # the rule is unambiguous
    layers = {}
    for key, tensor in load_file(str(path)).items():
        match = KOHYA_KEY.match(key)
        assert match, f"not a kohya key: {key}"
        assert match.group(1) in by_rule, f"{key} names no Linear layer of the UNet"
        layers.setdefault(by_rule[match.group(1)], {})[match.group(2)] = tensor
    return layers


@pytest.mark.parametrize("case", CASES)
def test_kohya_keys_ranks_alphas_and_metadata(model, adapters, case, tmp_path):
    adapter, _ = adapters[case]
    method, n, _, rank = CASES[case]
    path = export_lora(adapter, "kohya", tmp_path / "lora.safetensors")
    unet = load_pipeline(model).unet
    layers = kohya_layers(path, unet)
    targets = [name for name, _ in unet.named_modules() if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert targets and sorted(layers) == sorted(targets)
    assert any(name.endswith("to_out.0") for name in layers)
    for name, tensors in layers.items():
        linear = unet.get_submodule(name)
        assert set(tensors) == {"lora_down.weight", "lora_up.weight", "alpha"}
        # one rank, the bound, in every layer, and alpha = rank (scale 1 in every tool)
        assert tensors["lora_down.weight"].shape == (rank, linear.in_features), name
        assert tensors["lora_up.weight"].shape == (linear.out_features, rank), name
        assert tensors["alpha"].shape == () and tensors["alpha"].item() == rank
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == str(rank)
    assert (meta["ether_method"], meta["ether_n_blocks"]) == (method, str(n))
    assert meta["ether_source_sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert meta["ether_instance_prompt"] == PROMPT


def test_diffusers_file_holds_peft_keys_and_its_lora_config(adapters, tmp_path):
    adapter, _ = adapters["ether+-n1"]
    # a folder as OUT: the file gets diffusers' default name, so load_lora_weights(folder) finds it
    path = export(adapter, "diffusers", tmp_path)
    assert path == tmp_path / EXPORT_FILE_NAMES["diffusers"]
    keys = load_file(str(path))
    assert all(re.fullmatch(r"unet\.[\w.]+\.lora_[AB]\.weight", k) for k in keys) and len(keys) == 2 * 32
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == config["unet.lora_alpha"] == 4
    assert len(config["unet.target_modules"]) == 32 and meta["ether_method"] == "ether+"
    pipe = load_pipeline(TINY)
    pipe.load_lora_weights(str(tmp_path))
    assert relative_error(unet_output(pipe), adapters["ether+-n1"][1]) < 1e-5


# --------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method", ["oft", "naive"])
def test_full_rank_methods_are_refused_and_pointed_to_merged(method, tmp_path, capsys):
    adapter = write_adapter(TINY, method, 4, 4, tmp_path / "adapter.safetensors")
    for fmt in ("kohya", "diffusers"):
        with pytest.raises(UserError, match="--format merged"):
            export_lora(adapter, fmt, tmp_path / "lora.safetensors")
        capsys.readouterr()
        assert "--format merged" in fails(export_main, [adapter, "--format", fmt, tmp_path / "lora.safetensors"], capsys)
    assert not (tmp_path / "lora.safetensors").exists()


def test_bad_inputs_are_one_line_errors(adapters, tmp_path, capsys):
    adapter, _ = adapters["ether-n1"]
    lora = export_lora(adapter, "kohya", tmp_path / "lora.safetensors")
    for argv, message in [
        ([str(tmp_path / "missing.safetensors"), "--format", "kohya", str(tmp_path / "x.safetensors")], "not found"),
        ([str(lora), "--format", "kohya", str(tmp_path / "x.safetensors")], "not an ether-diffusion adapter"),
        ([str(adapter), "--format", "kohya", str(tmp_path / "x.safetensors"), "--model", str(tmp_path / "nowhere")],
         "model folder not found"),
    ]:
        capsys.readouterr()
        assert message in fails(export_main, argv, capsys)
    bare = tmp_path / "bare.safetensors"
    pipe = load_pipeline(TINY)
    inject_adapters(pipe.unet, AdapterConfig(method="ether"))
    save_adapter(pipe.unet, bare)  # no base_model in the header
    with pytest.raises(UserError, match="pass --model"):
        export_lora(bare, "kohya", tmp_path / "x.safetensors")


@pytest.mark.user_error("export with the output path equal to the input adapter", tool="ether_diffusion.export")
def test_an_export_never_overwrites_its_input(adapters, tmp_path, capsys):
    adapter = shutil.copy(adapters["lora-r4"][0], tmp_path / "adapter.safetensors")
    before = hashlib.sha256(adapter.read_bytes()).hexdigest()
    for fmt in ("kohya", "diffusers"):
        line = fails(export_main, [adapter, "--format", fmt, adapter], capsys)
        assert line == (f"error: the export {adapter} is the adapter {adapter}, which this command reads: write to "
                        "another path")
    assert hashlib.sha256(adapter.read_bytes()).hexdigest() == before


@pytest.mark.user_error("export --format merged into the local base model's own folder", tool="ether_diffusion.export")
def test_a_merged_export_never_replaces_its_base_model(adapters, tiny_sd_path, tmp_path, capsys):
    base = shutil.copytree(tiny_sd_path, tmp_path / "base")
    line = fails(export_main, [adapters["lora-r4"][0], "--format", "merged", base, "--model", base,
                               "--allow_other_base"], capsys)  # the same model, copied
    assert f"the export {base} is the base model {base}, which this command reads" in line
    assert (base / "model_index.json").is_file() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.user_error("export --model with another base of the same architecture than the adapter's",
                        tool="ether_diffusion.export")
def test_another_base_model_than_the_adapters_is_refused_unless_allowed(adapters, tiny_sd_path, tmp_path, capsys,
                                                                         monkeypatch):
    from ether_diffusion.tiny_sd import build_tiny_sd

    adapter, _ = adapters["ether-n1"]  # trained on builtin:tiny-sd (its header says so)
    other = build_tiny_sd(tmp_path / "other-sd", seed=1)  # the same architecture, other weights
    out = tmp_path / "lora.safetensors"
    line = fails(export_main, [adapter, "--format", "kohya", out, "--model", other], capsys)
    assert line == (f"error: {adapter} was trained on {TINY}, not on --model {other}: pass --allow_other_base to "
                    "export it on that model anyway")
    with pytest.raises(UserError, match="was trained on"):
        export_merged(adapter, tmp_path / "merged", model=str(other))
    assert not out.exists() and not (tmp_path / "merged").exists()
    assert export_main([str(adapter), "--format", "kohya", str(out), "--model", str(other), "--allow_other_base"]) == out
    assert read_safetensors_metadata(out)["ether_base_model"] == str(other)
    # the adapter's own base written another way is the same model: its cache folder, relative, with a /
    monkeypatch.chdir(Path(tiny_sd_path).parent)
    for same in (tiny_sd_path, f"{Path(tiny_sd_path).name}/"):
        assert export_main([str(adapter), "--format", "kohya", str(out), "--model", same]) == out


@pytest.mark.user_error("export into a read-only folder (a LoRA file, or a merged folder)", tool="ether_diffusion.export")
def test_an_export_into_a_read_only_folder_is_refused_before_the_model_loads(adapters, tmp_path, capsys, read_only,
                                                                              monkeypatch):
    import ether_diffusion.export as export_module

    def no_model(*args, **kwargs):
        raise AssertionError("loaded the model for an export that cannot be written")

    monkeypatch.setattr(export_module, "load_adapted_models", no_model)
    monkeypatch.setattr(export_module, "load_pipeline", no_model)
    adapter, _ = adapters["lora-r4"]
    shared = read_only(tmp_path / "shared")
    for fmt, out, named in (("kohya", shared / "lora.safetensors", "the export " + str(shared / "lora.safetensors")),
                            ("diffusers", f"{shared}/", f"the export {shared / EXPORT_FILE_NAMES['diffusers']}"),
                            ("merged", shared / "merged", str(shared / "merged"))):
        line = fails(export_main, [adapter, "--format", fmt, out], capsys)
        assert line == f"error: {named}: {shared} is not writable (a read-only folder, or another user's?)"
    assert list(shared.iterdir()) == []


def test_a_lora_export_to_a_new_folder_written_with_a_slash_goes_inside_it(adapters, tmp_path):
    path = export_main([str(adapters["lora-r4"][0]), "--format", "diffusers", f"{tmp_path / 'newdir'}/"])
    assert path == tmp_path / "newdir" / EXPORT_FILE_NAMES["diffusers"] and path.is_file()


# --------------------------------------------------------------------------------------- merged
def test_merged_folder_is_stock_diffusers_for_any_method(tmp_path):
    from diffusers import StableDiffusionPipeline

    adapter = write_adapter(TINY, "oft", 4, 4, tmp_path / "adapter.safetensors")
    out = export_main([str(adapter), "--format", "merged", str(tmp_path / "merged")])
    pipe = StableDiffusionPipeline.from_pretrained(out)
    torch.testing.assert_close(unet_output(pipe), unet_output(load_pipeline(TINY, adapter=adapter, merge=True)))
    half = export_merged(adapter, tmp_path / "merged", dtype=torch.float16)  # an older export is replaced
    assert {t.dtype for t in load_file(str(half / "unet" / "diffusion_pytorch_model.safetensors")).values()} == {torch.float16}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        export_merged(adapter, tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------- exported files where adapters go
def test_load_pipeline_and_apply_adapter_take_exported_files(adapters, tmp_path):
    (adapter_a, merged_a), (adapter_b, merged_b) = adapters["ether+-n4"], adapters["lora-r4"]
    lora_a = export_lora(adapter_a, "kohya", tmp_path / "a.safetensors", dtype=torch.float32)
    lora_b = export_lora(adapter_b, "diffusers", tmp_path / "b.safetensors", dtype=torch.float32)
    # what `python -m ether_diffusion.sample --adapter lora_kohya.safetensors` does: load and fuse
    assert relative_error(unet_output(load_pipeline(TINY, adapter=lora_a, merge=True)), merged_a) < 1e-5
    # the evaluator switches files in one pipeline: each replaces the last
    pipe = load_pipeline(TINY)
    assert apply_adapter(pipe, lora_a) == "lora"
    apply_adapter(pipe, lora_b)
    assert relative_error(unet_output(pipe), merged_b) < 1e-5
    apply_adapter(pipe, lora_a)
    assert relative_error(unet_output(pipe), merged_a) < 1e-5
    with pytest.raises(UserError, match="load it into a fresh pipeline"):
        apply_adapter(pipe, adapter_a)
    with pytest.raises(UserError, match="load it into a fresh pipeline"):
        apply_adapter(load_pipeline(TINY, adapter=adapter_a), lora_a)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="neither an ether-diffusion adapter nor a LoRA file"):
        apply_adapter(load_pipeline(TINY), other)


def write_dreambooth_dataset(root):
    """The DreamBooth layout with one subject and two prompts (the evaluator's protocol file format)."""
    (root / "toy").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(root / "toy" / "00.jpg")
    (root / PROMPTS_FILE).write_text("Classes\nsubject_name,class\ntoy,toy\n\nPrompts\n\nObject Prompts\n"
                                     "'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
                                     "'a {0} {1} in the snow'.format(unique_token, class_token),\n\n"
                                     "Live Subject Prompts\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n")
    return root


def test_evaluator_gives_the_same_images_from_the_exported_file(adapters, tmp_path):
    dataset = write_dreambooth_dataset(tmp_path / "dataset")
    adapter, _ = adapters["ether+-n1"]
    subjects = tmp_path / "adapters"
    (subjects / "toy").mkdir(parents=True)
    (subjects / "toy" / "adapter.safetensors").write_bytes(adapter.read_bytes())
    export_lora(adapter, "kohya", subjects / "toy" / EXPORT_FILE_NAMES["kohya"], dtype=torch.float32)
    images = {}
    for name in ("adapter.safetensors", EXPORT_FILE_NAMES["kohya"]):
        out = tmp_path / name
        dreambooth.main(["--dataset", str(dataset), "--model", TINY, "--adapters", str(subjects), "--adapter_file", name,
                         "--output_dir", str(out), "--images_per_prompt", "2", "--num_inference_steps", "3",
                         "--skip_metrics"])
        images[name] = [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.glob("toy/*/*.png"))]
    ours, exported = images.values()
    assert len(ours) == len(exported) == 4
    # 8-bit images from UNets equal to ~1e-7: at most a rounding step apart, almost every pixel identical
    differences = np.stack([np.abs(a - b) for a, b in zip(ours, exported)])
    assert differences.max() <= 1 and (differences > 0).mean() < 0.01


# --------------------------------------------------------------------------------------- trainers
def test_model_card(adapters, tmp_path):
    from huggingface_hub import ModelCard

    adapter, _ = adapters["ether+-n4"]
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter.safetensors").write_bytes(adapter.read_bytes())
    (out / "samples").mkdir()
    Image.new("RGB", (8, 8)).save(out / "samples" / "final.png")
    written = finish_run(out, out / "adapter.safetensors", "kohya", out / "samples" / "final.png")
    assert written == [out / EXPORT_FILE_NAMES["kohya"], out / "README.md"]
    card = ModelCard.load(out / "README.md")
    assert card.data.instance_prompt == PROMPT and "lora" in card.data.tags and "ether-plus" in card.data.tags
    for needle in (f"ETHER+ adapter for {TINY}", "n = 4 blocks", "7 steps", f"Trigger prompt: `{PROMPT}`",
                   "](samples/final.png)", "exact rank-16 LoRA", f'load_pipeline("{TINY}")',
                   'load_lora_weights("run", weight_name="lora_kohya.safetensors")', "ComfyUI/models/loras",
                   "<lora:lora_kohya:1>"):
        assert needle in card.text, needle

    # a hub base model and a full-rank method without an export: how to load it, and why no LoRA
    pipe = load_pipeline(TINY)
    inject_adapters(pipe.unet, AdapterConfig(method="oft", n_blocks=4))
    sd15 = "runwayml/stable-diffusion-v1-5"
    save_adapter(pipe.unet, tmp_path / "oft" / "adapter.safetensors", extra_metadata={"base_model": sd15, "steps": 3})
    card = ModelCard.load(finish_run(tmp_path / "oft", tmp_path / "oft" / "adapter.safetensors")[0])
    assert card.data.base_model == sd15 and "instance_prompt" not in card.data.to_dict()
    for needle in (f'StableDiffusionPipeline.from_pretrained("{sd15}"', 'load_adapter(pipe.unet, "oft/adapter.safetensors")',
                   "no LoRA file holds it", "--format merged"):
        assert needle in card.text, needle


@pytest.mark.parametrize("name", ["train_dreambooth", "train_controlnet_s2i"])
def test_trainers_refuse_export_lora_for_full_rank_methods_before_training(name, tmp_path, capsys):
    script = {"train_dreambooth": dreambooth_trainer, "train_controlnet_s2i": s2i_trainer}[name]
    data = ["--instance_data_dir", "builtin:demo-subject", "--instance_prompt", PROMPT] if name == "train_dreambooth" \
        else ["--train_data_dir", "builtin:tiny-ade20k"]
    line = fails(script.main, ["--pretrained_model_name_or_path", TINY, *data, "--output_dir", tmp_path / "run",
                               "--method", "oft", "--export_lora", "kohya"], capsys)
    assert "--export_lora" in line and "--format merged" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.user_error("--export_merged equal to the trainer's --output_dir (or a folder above it)", tool="train_dreambooth.py")
def test_trainers_refuse_a_merged_export_that_would_replace_the_run(tmp_path, capsys):
    script = dreambooth_trainer
    for merged in (tmp_path / "run", tmp_path):
        line = fails(script.main, ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", "builtin:demo-subject",
                                   "--instance_prompt", PROMPT, "--output_dir", tmp_path / "run", "--export_merged", merged],
                     capsys)
        assert line == (f"error: --export_merged {merged} would replace the run's --output_dir {tmp_path / 'run'}: "
                        "choose another folder for the merged model")
