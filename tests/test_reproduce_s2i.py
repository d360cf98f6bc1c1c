"""evaluate/reproduce.py on S2I (Table 3, on the tiny SD), the driver in the test's process: a failed run is named and the exit
code says so, a rerun retries it and leaves the finished one alone, other settings in the same folder are
refused. DreamBooth and the pieces: test_reproduce.py."""
import json

import pytest
from reproduce_helpers import drive, trainer_starts

from ether_diffusion.errors import UserError
from ether_diffusion.tiny_ade20k import write_tiny_ade20k
from evaluate import reproduce
from evaluate.paper_tables import TABLE_3
from evaluate.tiny_backbones import write_tiny_backbones

S2I_CONFIG = """pretrained_model_name_or_path: builtin:tiny-sd
method: {method}
{setting}resolution: 32
train_batch_size: 1
max_train_steps: 2
learning_rate: 1e-3
seed: 0
num_validation_images: 1
validation_inference_steps: 1
validation_steps: 1000
report_to: none
"""


def test_s2i_a_failed_run_is_named_and_the_exit_code_says_so(tmp_path, capsys):
    """Table 3 on one process: encoder-only trains, is selected and evaluated; the ETHER config asks for blocks
    the tiny SD's widths cannot hold, so its trainer fails; the report names it and the exit code is 1."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "none.yaml").write_text(S2I_CONFIG.format(method="none", setting=""))
    (configs / "s2i-ether.yaml").write_text(S2I_CONFIG.format(method="ether", setting="n_blocks: 7\n"))
    dataset = write_tiny_ade20k(tmp_path / "ade", n_train=2, n_val=2, size=48)
    b = write_tiny_backbones(tmp_path / "backbones")
    out = tmp_path / "out"
    argv = ["s2i", "--dataset", str(dataset), "--config_dir", str(configs),
            "--methods", "none,ether", "--output_dir", str(out), "--select_every", "1", "--select_maps", "1",
            "--eval_args", f"--segmenter {b['upernet']} --inception {b['inception']} --limit 2 --num_inference_steps 1"]
    code, said = drive(argv), capsys.readouterr().out
    assert code == 1, said[-3000:]
    assert "FAILED ether (train): layer " in said and "is not divisible by n_blocks=7" in said
    md = (out / "report.md").read_text()
    assert "## Failed" in md and "- ether (train): layer " in md
    # the paper's Table 3, our encoder-only row under its "Encoder-only" row, with the encoder's size
    report = json.loads((out / "report.json").read_text())
    assert report["paper"]["rows"] == [list(row) for row in TABLE_3]
    lines = md.splitlines()
    ours = lines.index("| Encoder-only (paper) | 0 |  | 8.2 | 38.0 | 41.2 |  |  |") + 1
    assert lines[ours].startswith("| **none (ours)** | 0 | ")
    none = next(row for row in report["ours"] if row["variant"] == "none")
    assert none["parameters"]["encoder"] > 0 and 0 <= none["metrics"]["miou"] <= 1
    assert len(list((out / "eval/none/images").glob("*.png"))) == 2 and (out / "grids/maps.png").is_file()
    # selection on the first map by mIoU, both steps scored
    record = json.loads((out / "runs/none/selection.json").read_text())
    assert [c["step"] for c in record["candidates"]] == [1, 2] and record["criterion"] == "miou"
    assert record["subset"] == "the first 1 validation maps"
    # run again: the failed run is tried again (and fails again), the done one is left alone
    assert drive(argv) == 1
    assert trainer_starts(out / "runs/ether") == 2 and trainer_starts(out / "runs/none") == 1
    # the same folder with other settings is refused, naming the setting
    args = reproduce.parse_args(argv[:-2] + ["--select_maps", "2", *argv[-2:]])
    with pytest.raises(UserError, match="holds a reproduction made with select_maps = 1, but this command asks for 2"):
        reproduce.check_settings(args, reproduce.plan_runs(args, None))
