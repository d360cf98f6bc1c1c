"""evaluate/s2i.py end to end on the tiny SD, a tiny ADE20K folder and the offline stand-in backbones."""
import copy
import csv
import functools
import json

import pytest
import torch
from PIL import Image

from ether_diffusion import AdapterConfig, inject_adapters, save_adapter
from ether_diffusion.ade20k import load_palette
from ether_diffusion.control import make_control_encoder, save_control_encoder
from ether_diffusion.errors import run_cli
from ether_diffusion.tiny_ade20k import FIXTURE_CLASSES, write_tiny_ade20k
from evaluate import s2i
from evaluate.tiny_backbones import write_tiny_backbones
from user_errors import case, record

TINY_FACTOR = 4  # tiny SD: 32 px images, 8x8 latents
TOOL = "evaluate/s2i.py"


def write_control_dir(tiny_unet, folder):
    """A training-output-like folder: an ETHER adapter (drawn from torch's global generator) on a copy of the tiny
    UNet, and its control encoder."""
    unet = copy.deepcopy(tiny_unet)
    inject_adapters(unet, AdapterConfig(method="ether", n_blocks=4))
    save_adapter(unet, folder / "adapter.safetensors")
    save_control_encoder(make_control_encoder(unet, TINY_FACTOR), folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _tiny_unet):
    """A training output folder, 4 validation maps and the stand-in backbones."""
    root = tmp_path_factory.mktemp("s2i_eval")
    return {"root": root, "control": write_control_dir(_tiny_unet, root / "control"),
            "dataset": write_tiny_ade20k(root / "ade", n_train=1, n_val=4, size=48),
            "backbones": write_tiny_backbones(root / "backbones")}


def _args(setup, output_dir, extra=()):
    b = setup["backbones"]
    return ["--dataset", str(setup["dataset"]), "--model", "builtin:tiny-sd", "--control_dir", str(setup["control"]),
            "--output_dir", str(output_dir), "--limit", "3", "--resolution", "32", "--batch_size", "2",
            "--num_inference_steps", "2", "--segmenter", str(b["upernet"]), "--inception", str(b["inception"]), *extra]


@pytest.fixture(scope="module")
def run(setup):
    output_dir = setup["root"] / "out"
    return output_dir, s2i.main(_args(setup, output_dir))


def test_generates_each_map_and_reports(run):
    output_dir, report = run
    names = [f"ADE_val_{i:08d}" for i in (1, 2, 3)]  # --limit 3 of 4
    assert sorted(p.stem for p in (output_dir / "images").iterdir()) == names
    assert all(Image.open(output_dir / "images" / f"{n}.png").size == (32, 32) for n in names)

    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved["metrics"] == report["metrics"]
    assert set(report["metrics"]) == {"miou", "accuracy", "fid", "real_miou", "real_accuracy"}
    assert 0 <= report["metrics"]["miou"] <= 1 and 0 <= report["metrics"]["accuracy"] <= 1
    assert report["images"] == 3 and report["black_skipped"] == 0
    with open(output_dir / "per_image.csv", newline="") as f:
        assert [row["name"] for row in csv.DictReader(f)] == names
    summary = (output_dir / "summary.md").read_text()
    # the paper's rows, as the paper prints them (Table 3)
    assert "| ETHER+ (paper Table 3) | 0.4M | 27.3 | 68.1 | 31.0 |" in summary
    assert "| Encoder-only (paper Table 3) | 0 | 8.2 | 38.0 | 41.2 |" in summary
    assert Image.open(output_dir / "grids" / "grid_00.png").size == (3 * 32, 3 * 32)  # map | generated | real


def test_rerun_generates_nothing(run, setup, capsys):
    output_dir, _ = run
    before = {p: p.stat().st_mtime_ns for p in (output_dir / "images").iterdir()}
    s2i.main(_args(setup, output_dir, extra=["--skip_metrics"]))
    assert "3 of 3 images already done; generating 0" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (output_dir / "images").iterdir()} == before


def test_black_images_are_skipped_and_counted(run, setup, tmp_path):
    import shutil

    output_dir = tmp_path / "out"
    shutil.copytree(run[0] / "images", output_dir / "images")
    Image.new("RGB", (32, 32)).save(output_dir / "images" / "ADE_val_00000002.png")
    report = s2i.main(_args(setup, output_dir, extra=["--skip_generation"]))
    assert report["black_skipped"] == 1


def _cli(argv, capsys):
    """The run must exit 2 with an error line last (after any progress bars); returns it, recorded for the table."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(s2i.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return record(last)


@pytest.mark.user_error("a --control_dir without an encoder; scoring before generating; --limit 0", tool=TOOL)
def test_bad_inputs_are_clear_errors(setup, tmp_path, capsys):
    err = _cli(_args(setup, tmp_path / "a", extra=["--control_dir", str(tmp_path / "nothing")]), capsys)
    assert "control_encoder.safetensors does not exist" in err
    err = _cli(_args(setup, tmp_path / "b", extra=["--skip_generation"]), capsys)
    assert "ADE_val_00000001.png does not exist: generation is incomplete" in err
    err = _cli(_args(setup, tmp_path / "c", extra=["--limit", "0"]), capsys)
    assert "--limit must be at least 1" in err


bad = functools.partial(case, tool=TOOL)


@pytest.mark.parametrize("extra, message", [
    bad(["--batch_size", "0"], "--batch_size must be at least 1, got 0", "--batch_size 0"),
    bad(["--limit", "99999999999999999999"], "--limit 99999999999999999999 is too large (at most 9223372036854775807)",
        "an integer beyond 64 bits"),
])
def test_bad_numbers_are_one_line(setup, tmp_path, capsys, extra, message):
    argv = _args(setup, tmp_path / "out") + extra  # the later flag wins
    assert _cli(argv, capsys) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_metrics_nothing_was_scored_for_are_null_with_the_reason(run, setup, tmp_path):
    import shutil

    output_dir = tmp_path / "out"
    shutil.copytree(run[0] / "images", output_dir / "images")
    for image in (output_dir / "images").iterdir():
        Image.new("RGB", (32, 32)).save(image)
    report = s2i.main(_args(setup, output_dir, extra=["--skip_generation"]))
    assert report["black_skipped"] == 3
    assert report["metrics"]["miou"] is None and report["metrics"]["fid"] is None
    assert report["not_computed"]["miou"] == "all 3 generated images are all-black, so none was segmented"
    assert report["not_computed"]["fid"] == "0 generated image(s) are not all-black: FID needs at least 2"
    assert report["metrics"]["real_miou"] is not None and "real_miou" not in report["not_computed"]

    def refuse(token):
        raise ValueError(f"metrics.json holds {token}, which is not JSON")

    assert json.loads((output_dir / "metrics.json").read_text(), parse_constant=refuse)["metrics"] == report["metrics"]
    assert "Not computed: fid: 0 generated image(s)" in (output_dir / "summary.md").read_text()


class PaletteOracle:
    """Stands in for UperNet: labels each pixel with the nearest palette colour among the fixture's classes.
    On an image that *is* the coloured map, that is exactly the map."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, images):
        import numpy as np

        colors = load_palette()[0][list(FIXTURE_CLASSES)].astype(np.int64)
        maps = []
        for image in images:
            pixels = np.asarray(image).astype(np.int64)[..., None, :]
            nearest = ((pixels - colors) ** 2).sum(-1).argmin(-1)
            maps.append(np.asarray(FIXTURE_CLASSES, dtype=np.uint8)[nearest])
        return maps


def test_scores_align_labels_with_generated_images(setup, tmp_path, monkeypatch):
    """'Generated' images that are the coloured maps themselves, and a segmenter that reads colours back:
    mIoU and accuracy must be exactly 1 (same crop, same resize, label offset right, label 0 ignored)."""
    import torchvision.transforms.functional as TF

    output_dir = tmp_path / "out"
    args = s2i.parse_args(_args(setup, output_dir, extra=["--skip_generation"]))
    dataset = s2i.load_dataset(args)
    (output_dir / "images").mkdir(parents=True)
    for i in range(len(dataset)):
        TF.to_pil_image(dataset[i]["conditioning_pixel_values"]).save(s2i.generated_path(args, dataset, i))
    monkeypatch.setattr(s2i, "UperNetSegmenter", PaletteOracle)
    report = s2i.main(_args(setup, output_dir, extra=["--skip_generation"]))
    assert report["metrics"]["miou"] == pytest.approx(1.0)
    assert report["metrics"]["accuracy"] == pytest.approx(1.0)


@pytest.mark.user_error("a rerun into the same --output_dir with another --control_dir", tool=TOOL)
def test_another_control_dir_makes_its_own_images_and_scores(run, setup, tmp_path, capsys, _tiny_unet):
    import shutil

    output_dir = tmp_path / "out"
    shutil.copytree(run[0], output_dir)
    before = {p.name: p.read_bytes() for p in (output_dir / "images").iterdir()}
    torch.manual_seed(5)  # another ETHER draw than the fixture's: another model
    other = write_control_dir(_tiny_unet, tmp_path / "other")
    report = s2i.main(_args(setup, output_dir, extra=["--control_dir", str(other)]))
    assert "0 of 3 images already done; generating 3" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in (output_dir / "images").iterdir()}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    assert report["metrics"]["fid"] != run[1]["metrics"]["fid"] and report["settings"]["control_dir"] == str(other)
