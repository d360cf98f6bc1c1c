"""The checks the tools share (`ether_diffusion/checks.py` and the parser's finite-number check, through each
tool's own parse: `sample.parse_args`, `evaluate/harness.parse_args`, `arguments.check_common_args`): each mistake
is written once and run through every tool that takes the flag. Each tool's own test file keeps its own flags."""
import pytest

from ether_diffusion import sample
from evaluate import dreambooth, s2i
from trainer_helpers import TINY, TRAINERS, trainer_args
from user_errors import refused

SAMPLE, EVAL_DREAMBOOTH, EVAL_S2I = "python -m ether_diffusion.sample", "evaluate/dreambooth.py", "evaluate/s2i.py"

# tool -> its parse on a command line it accepts, `extra` last (the later flag wins); all refuse before reading a file
PARSE = {
    SAMPLE: lambda tmp, extra: sample.parse_args(["--model", TINY, "--prompt", "a photo of qwe toy",
                                                  "--grid", str(tmp / "grid.png"), *extra]),
    EVAL_DREAMBOOTH: lambda tmp, extra: dreambooth.parse_args(["--dataset", str(tmp), "--model", TINY, "--adapters",
                                                               str(tmp), "--output_dir", str(tmp / "out"), *extra]),
    EVAL_S2I: lambda tmp, extra: s2i.parse_args(["--dataset", str(tmp), "--output_dir", str(tmp / "out"),
                                                 "--skip_generation", *extra]),
    TRAINERS: lambda tmp, extra: trainer_args("--output_dir", tmp / "out", *extra),
}
EVERY_TOOL = tuple(PARSE)
SAMPLERS = (SAMPLE, EVAL_DREAMBOOTH, EVAL_S2I)  # the tools that run a pipeline: its steps and guidance

SHARED_MISTAKES = [  # (the flags, the error, the mistake in docs/user_errors.md, the tools that take the flag)
    (["--num_inference_steps", "0"], "--num_inference_steps must be at least 1, got 0", "--num_inference_steps 0",
     SAMPLERS),
    (["--resolution", "30"], "--resolution 30 is not a positive multiple of 8", "--resolution 30", EVERY_TOOL),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1", "a negative --seed", EVERY_TOOL),
    (["--seed", "4294967296"], "--seed must be in [0, 2**32), got 4294967296", "a --seed beyond 2**32", EVERY_TOOL),
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan", "--guidance_scale nan", SAMPLERS),
    (["--guidance_scale", "inf"], "--guidance_scale must be a finite number, got inf", "--guidance_scale inf", SAMPLERS),
    (["--output_dir", "{tmp}/a-file"], "--output_dir {tmp}/a-file is a file, not a folder", "--output_dir naming a file",
     (EVAL_DREAMBOOTH, EVAL_S2I, TRAINERS)),
]


@pytest.mark.parametrize("tool", EVERY_TOOL)
def test_each_tools_command_line_here_is_accepted(tmp_path, tool):
    """The command lines above are good as they are (this parse raises no UserError): a refusal below is the
    mistake's."""
    PARSE[tool](tmp_path, [])


@pytest.mark.parametrize("tool, extra, message", [
    pytest.param(tool, extra, message, marks=pytest.mark.user_error(mistake, tool=tool), id=f"{tool}: {mistake}")
    for extra, message, mistake, tools in SHARED_MISTAKES for tool in tools])
def test_a_shared_mistake_is_the_same_one_line_in_every_tool(tmp_path, tool, extra, message):
    (tmp_path / "a-file").write_text("x")
    with refused() as e:
        PARSE[tool](tmp_path, [a.format(tmp=tmp_path) for a in extra])
    assert str(e.value) == message.format(tmp=tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "grid.png").exists()
