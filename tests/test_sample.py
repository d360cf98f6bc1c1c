"""`python -m ether_diffusion.sample`: sample grids from a model + adapter outside training."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ether_diffusion import AdapterConfig, inject_adapters, save_adapter
from ether_diffusion.adapters import adapter_state_dict
from ether_diffusion.errors import run_cli
from ether_diffusion.sample import main
from ether_diffusion.builtin import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
TINY = "builtin:tiny-sd"


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model is much faster on one thread, and on a busy 2-core machine two threads can be 50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """An ETHER+ adapter for the tiny model, moved away from the identity (as training would)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(resolve_model_path(TINY), subfolder="unet")
    inject_adapters(unet, AdapterConfig(method="ether+", n_blocks=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapter_state_dict(unet).items():
            if name.endswith("ether_v") or name.endswith("ether_v_out"):
                p.add_(torch.randn_like(p))
    return save_adapter(unet, tmp_path_factory.mktemp("adapter") / "adapter.safetensors")


def args(grid, *extra):
    return ["--model", TINY, "--prompt", "a photo of qwe toy", "--prompt", "a photo of qwe toy on the beach",
            "--num_images", "3", "--num_inference_steps", "2", "--grid", str(grid), *map(str, extra)]


def test_the_module_cli_writes_a_prompts_by_images_grid(adapter, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ether_diffusion.sample",
           *args(tmp_path / "grid.png", "--adapter", adapter, "--out_dir", tmp_path / "images")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 prompts x 3 images" in proc.stdout
    assert Image.open(tmp_path / "grid.png").size == (3 * 32, 2 * 32)
    expected = [f"{r:02d}-{c:02d}.png" for r in range(2) for c in range(3)]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == expected


def test_the_adapter_changes_the_samples_and_a_seed_repeats_them(adapter, tmp_path):
    main(args(tmp_path / "a.png", "--adapter", adapter, "--seed", 7))
    main(args(tmp_path / "b.png", "--adapter", adapter, "--seed", 7))
    main(args(tmp_path / "base.png", "--seed", 7))
    main(args(tmp_path / "other-seed.png", "--adapter", adapter, "--seed", 8))
    a, b, base, other = (Image.open(tmp_path / n).tobytes() for n in ("a.png", "b.png", "base.png", "other-seed.png"))
    assert a == b and a != base and a != other


@pytest.mark.parametrize("extra, message", [
    (["--adapter", "missing.safetensors"], "adapter file not found: missing.safetensors"),
    (["--resolution", "30"], "--resolution 30 is not a positive multiple of 8"),
    (["--num_images", "0"], "--num_images and --num_inference_steps must be at least 1"),
    (["--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        run_cli(main, args(tmp_path / "g.png", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


def test_a_file_that_is_not_an_adapter_is_named(tmp_path, capsys):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_text("not safetensors")
    with pytest.raises(SystemExit):
        run_cli(main, args(tmp_path / "g.png", "--adapter", bogus))
    assert f"{bogus} is not a safetensors file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(main, ["--model", TINY, "--grid", str(tmp_path / "g.png")])
    assert "the following arguments are required: --prompt" in capsys.readouterr().err
