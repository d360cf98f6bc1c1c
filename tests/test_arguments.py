"""The trainers' command line and YAML config layer (ether_diffusion/arguments.py)."""
import functools
import re

import pytest

from ether_diffusion import arguments
from ether_diffusion.trainers import dreambooth as dreambooth_trainer
from trainer_helpers import REPO, TINY, TRAINERS, fails, make_parser, trainer_args
from user_errors import case, refused


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


config_case = functools.partial(case, tool=f"{TRAINERS} --config")


@pytest.mark.parametrize("text, message", [
    config_case("lerning_rate: 1.0e-3\n", "unknown key 'lerning_rate' (did you mean 'learning_rate'?)", "a misspelt key"),
    config_case("method: dora\n", "method: invalid choice 'dora'", "an unknown method"),
    config_case("max_train_steps: 1.5\n", "max_train_steps must be an integer", "a float for an integer"),
    config_case("learning_rate: fast\n", "learning_rate must be a number", "a word for a number"),
    config_case("center_crop_typo: 1\n", "unknown key 'center_crop_typo'", "an unknown key"),
    config_case("gradient_checkpointing: 3\n", "gradient_checkpointing must be true or false", "a number for a flag"),
    config_case("- a\n- b\n", "must hold a mapping", "a list instead of a mapping"),
    config_case("a: [\n", "is not valid YAML", "broken YAML"),
    config_case("resolution:\n", "resolution has no value: give one, or remove the key for the default 512",
                "a value left empty (`resolution:`)"),
    config_case("method: null\n", "method has no value: give one, or remove the key for the default 'ether+'",
                "`method: null`"),
    config_case(b"\x89\xfe\x00\xc3\x28 random \xff bytes", "is not a text file", "a file of random bytes"),
    config_case("learning_rate: .nan\n", "learning_rate must be a finite number, got nan", "`learning_rate: .nan`"),
    config_case("max_grad_norm: .inf\n", "max_grad_norm must be a finite number, got inf", "`max_grad_norm: .inf`"),
    config_case("max_train_steps: 99999999999999999999\n", "max_train_steps 99999999999999999999 is too large",
                "an integer beyond 64 bits"),
    config_case("learning_rate: 2024-01-01\n", "learning_rate must be a number, got datetime.date(2024, 1, 1)",
                "a date for a number"),
    config_case("seed: 2024-13-45\n", "is not valid YAML: month must be in 1..12", "a date-like value that is no date"),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with refused() as e:
        arguments.parse_args(make_parser(), ["--config", str(path)])
    assert message in str(e.value) and str(path) in str(e.value)


bad_value = functools.partial(case, tool=TRAINERS)


@pytest.mark.parametrize("argv, message", [
    bad_value(["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan", "--learning_rate nan"),
    bad_value(["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf", "--learning_rate inf"),
    bad_value(["--learning_rate", "0"], "--learning_rate must be positive, got 0.0", "--learning_rate 0"),
    bad_value(["--adam_beta1", "2.0"], "--adam_beta1 must be in [0, 1), got 2.0", "--adam_beta1 2.0"),
    bad_value(["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1), got 1.0", "--adam_beta2 1"),
    bad_value(["--adam_epsilon", "-1"], "--adam_epsilon must be positive, got -1.0", "--adam_epsilon -1"),
    bad_value(["--adam_weight_decay", "-0.1"], "--adam_weight_decay cannot be negative, got -0.1", "a negative weight decay"),
    bad_value(["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number, got nan", "--max_grad_norm nan"),
    bad_value(["--max_grad_norm", "0"], "--max_grad_norm must be positive, got 0.0", "--max_grad_norm 0"),
    bad_value(["--lora_alpha", "nan"], "--lora_alpha must be a finite number, got nan", "--lora_alpha nan"),
    bad_value(["--lora_alpha", "-4"], "--lora_alpha must be positive, got -4.0", "a negative --lora_alpha"),
    bad_value(["--lr_power", "0"], "--lr_power must be positive, got 0.0", "--lr_power 0"),
    bad_value(["--lr_num_cycles", "0"], "--lr_num_cycles must be at least 1, got 0", "--lr_num_cycles 0"),
    bad_value(["--max_train_steps", "99999999999999999999"],
              "--max_train_steps 99999999999999999999 is too large (at most 9223372036854775807)",
              "--max_train_steps 99999999999999999999 (was a tqdm OverflowError)"),
    bad_value(["--report_to", "foo"], "--report_to 'foo' is not a tracker (choose from all, aim, tensorboard",
              "--report_to foo"),
    bad_value(["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1, got 0",
              "--checkpoints_total_limit 0"),
])
def test_every_number_is_finite_and_in_its_range(argv, message):
    with refused(re.escape(message)):
        trainer_args(*argv)


@pytest.mark.user_error("--report_to a tracker whose package is not installed (was dropped silently)", tool=TRAINERS)
def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    monkeypatch.setattr(arguments, "get_available_trackers", lambda: [])
    with refused("--report_to wandb: its package is not installed"):
        trainer_args("--report_to", "wandb")
    assert trainer_args("--report_to", "none").report_to == "none"


@pytest.mark.user_error("--output_dir below a file", tool=TRAINERS)
def test_output_dir_below_a_file(tmp_path):
    (tmp_path / "notes").write_text("x")
    with refused(f"--output_dir {tmp_path / 'notes' / 'run'}: {tmp_path / 'notes'} is a file, not a folder"):
        trainer_args("--output_dir", tmp_path / "notes" / "run")


@pytest.mark.user_error("an unknown method, a missing config file, --resolution 36, no model", tool=TRAINERS)
def test_parser_errors_are_one_line_user_errors(tmp_path):
    with refused("invalid choice: 'dora'"):
        arguments.parse_args(make_parser(), ["--method", "dora"])
    with refused("config file not found"):
        arguments.parse_args(make_parser(), ["--config", str(tmp_path / "missing.yaml")])
    args = arguments.parse_args(make_parser(), ["--resolution", "36", "--pretrained_model_name_or_path", "m"])
    with refused("--resolution 36 is not a positive multiple of 8"):
        arguments.check_common_args(args)
    args = arguments.parse_args(make_parser(), [])
    with refused("--pretrained_model_name_or_path is required"):
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


# ------------------------------------------------------------------------------------ the trainers' own checks
@pytest.fixture(scope="module")
def dreambooth():
    return dreambooth_trainer


def dreambooth_args(out, *extra):
    return ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", "builtin:demo-subject", "--instance_prompt",
            "a photo of qwe toy", "--output_dir", out, "--resolution", 32, "--report_to", "none", *extra]


@pytest.mark.parametrize("flag, extra", [
    pytest.param("--class_data_dir", ["--with_prior_preservation", "--class_prompt", "a photo of toy"],
                 marks=pytest.mark.user_error("--class_data_dir naming a file", tool="train_dreambooth.py"),
                 id="--class_data_dir"),
    pytest.param("--export_merged", [],
                 marks=pytest.mark.user_error("--export_merged naming a file (failed after the adapter was written)",
                                              tool="train_dreambooth.py"), id="--export_merged"),
])
def test_folders_that_are_files_are_refused_before_training(dreambooth, tmp_path, capsys, flag, extra):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "out"
    line = fails(dreambooth.main, dreambooth_args(out, flag, tmp_path / "a-file", *extra), capsys)
    assert line == f"error: {flag} {tmp_path / 'a-file'} is a file, not a folder"
    assert not out.exists()  # refused before anything was written


@pytest.mark.user_error("a read-only --output_dir (or a new one below a read-only folder, or --export_merged there)",
                        tool="train_dreambooth.py")
def test_a_read_only_output_folder_is_refused_before_training(dreambooth, tmp_path, capsys, read_only):
    shared = read_only(tmp_path / "shared")
    for out, extra in ((shared, []), (shared / "run", []), (tmp_path / "out", ["--export_merged", shared / "merged"])):
        line = fails(dreambooth.main, dreambooth_args(out, *extra), capsys)
        flag, value = ("--export_merged", shared / "merged") if extra else ("--output_dir", out)
        assert line == f"error: {flag} {value}: {shared} is not writable (a read-only folder, or another user's?)"
    assert list(shared.iterdir()) == [] and not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.user_error("--prior_loss_weight nan", tool="train_dreambooth.py")
def test_trainer_specific_floats_are_checked_too(dreambooth, tmp_path, capsys):
    line = fails(dreambooth.main, dreambooth_args(tmp_path / "out", "--with_prior_preservation", "--class_prompt", "a toy",
                                                  "--prior_loss_weight", "nan"), capsys)
    assert line == "error: --prior_loss_weight must be a finite number, got nan"


@pytest.mark.parametrize("argv, message", [
    case(["--method", "ether+", "--rank", "8"], "--rank does not apply to --method ether+ (it takes --n_blocks)",
         "--rank with ETHER+ (ignored before)", tool=TRAINERS),
    case(["--method", "oft", "--lora_alpha", "8"], "--lora_alpha does not apply to --method oft (it takes --n_blocks)",
         "--lora_alpha with OFT", tool=TRAINERS),
    case(["--method", "lora", "--n_blocks", "4"], "--n_blocks does not apply to --method lora (it takes --rank, "
         "--lora_alpha)", "--n_blocks with LoRA", tool=TRAINERS),
])
def test_a_setting_the_method_does_not_use_is_refused(dreambooth, tmp_path, capsys, argv, message):
    args = ["--pretrained_model_name_or_path", TINY, "--instance_data_dir", tmp_path, "--instance_prompt", "a qwe toy",
            "--output_dir", tmp_path / "o", *argv]
    assert message in fails(dreambooth.main, args, capsys)
    assert not (tmp_path / "o").exists()


def test_each_method_gets_its_settings_and_their_defaults():
    for argv, want in ((["--method", "ether+"], {"n_blocks": 1, "rank": 4}),
                       (["--method", "oft", "--n_blocks", "4"], {"n_blocks": 4}),
                       (["--method", "hra", "--rank", "8"], {"rank": 8})):
        cfg = arguments.adapter_config_from_args(trainer_args(*argv))
        assert cfg.method == argv[1] and {k: getattr(cfg, k) for k in want} == want


def test_the_s2i_entry_point_script_runs_its_trainer(monkeypatch, capsys):
    """The scripts at the repository root are what `accelerate launch` runs: thin, but they must work
    (train_dreambooth.py's: test_train_dreambooth.py's demo launch). Run as `python train_controlnet_s2i.py --help`
    runs it, in this process."""
    import runpy

    monkeypatch.setattr("sys.argv", ["train_controlnet_s2i.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "train_controlnet_s2i.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: train_controlnet_s2i.py")
    assert "Semantic map" in out
