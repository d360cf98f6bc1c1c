"""The trainers' command line and YAML config layer (ether_diffusion/arguments.py)."""
import pytest

from ether_diffusion import arguments
from ether_diffusion.errors import UserError
from trainer_helpers import make_parser


def write_yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_values_are_defaults_and_the_command_line_wins(tmp_path):
    cfg = write_yaml(tmp_path, "learning_rate: 6e-3\nmax_train_steps: 1400\nmethod: oft\ngradient_checkpointing: true\n"
                               "target_modules: [to_q, to_v]\nvalidation_prompt: [a, b]\nn_blocks: 4\n")
    args = arguments.parse_args(make_parser(), ["--config", cfg, "--n_blocks", "2"])
    # `6e-3` without a dot is a string to YAML: it is converted like a command-line value
    assert args.learning_rate == pytest.approx(6e-3) and isinstance(args.learning_rate, float)
    assert (args.max_train_steps, args.method, args.gradient_checkpointing) == (1400, "oft", True)
    assert args.target_modules == ["to_q", "to_v"] and args.validation_prompt == ["a", "b"]
    assert args.n_blocks == 2  # command line over file
    # a repeatable flag on the command line replaces the file's list, it does not extend it
    args = arguments.parse_args(make_parser(), ["--config", cfg, "--validation_prompt", "c"])
    assert args.validation_prompt == ["c"]
    # without a config: the parser's own defaults
    args = arguments.parse_args(make_parser(), ["--target_modules", "to_k, to_out.0"])
    assert args.target_modules == ["to_k", "to_out.0"] and args.learning_rate is None and args.validation_prompt is None


@pytest.mark.parametrize("text, message", [
    ("lerning_rate: 1.0e-3\n", "unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
    ("method: dora\n", "method: invalid choice 'dora'"),
    ("max_train_steps: 1.5\n", "max_train_steps must be an integer"),
    ("learning_rate: fast\n", "learning_rate must be a number"),
    ("center_crop_typo: 1\n", "unknown key 'center_crop_typo'"),
    ("gradient_checkpointing: 3\n", "gradient_checkpointing must be true or false"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [\n", "is not valid YAML"),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    cfg = write_yaml(tmp_path, text)
    with pytest.raises(UserError) as e:
        arguments.parse_args(make_parser(), ["--config", cfg])
    assert message in str(e.value) and cfg in str(e.value) and "\n" not in str(e.value)


def test_parser_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="invalid choice: 'dora'"):
        arguments.parse_args(make_parser(), ["--method", "dora"])
    with pytest.raises(UserError, match="config file not found"):
        arguments.parse_args(make_parser(), ["--config", str(tmp_path / "missing.yaml")])
    args = arguments.parse_args(make_parser(), ["--resolution", "36", "--pretrained_model_name_or_path", "m"])
    with pytest.raises(UserError, match="--resolution 36 is not a positive multiple of 8"):
        arguments.check_common_args(args)
    args = arguments.parse_args(make_parser(), [])
    with pytest.raises(UserError, match="--pretrained_model_name_or_path is required"):
        arguments.check_common_args(args)


def test_default_learning_rates_come_from_the_method_table():
    for task, method, expected in (("dreambooth", "ether+", 6e-3), ("dreambooth", "oft", 6e-5), ("s2i", "ether", 1e-3),
                                   ("s2i", "naive", 1e-5)):
        args = arguments.parse_args(make_parser(), ["--method", method])
        arguments.finish_learning_rate(args, task)
        assert args.learning_rate == expected, (task, method)
    args = arguments.parse_args(make_parser(), ["--method", "lora", "--learning_rate", "0.5"])
    arguments.finish_learning_rate(args, "dreambooth")
    assert args.learning_rate == 0.5
    help_text = " ".join(make_parser().format_help().split())
    assert "ether 0.006, ether+ 0.006, oft 6e-05, naive 6e-05, lora 0.0006, hra 0.0006" in help_text
