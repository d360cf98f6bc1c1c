"""The learning-proof script's rules (no training here: test_toy_model.py trains one run): the learning-rate
rule, the shipped toy configs, the command line's one-line errors."""
import pytest

from ether_diffusion.adapters import METHODS
from ether_diffusion.arguments import read_yaml_mapping
from ether_diffusion.errors import UserError
from ether_diffusion.toy import learning


def result(subject, parts, scene):
    return {"subject": subject, "subject_parts": parts, "scene": scene}


def test_the_rate_rule():
    # most subjects found among the rates that keep scenes (>= 70%); a rate that loses scenes never wins
    assert learning.choose_rate({0.1: result(0.5, 0.9, 0.9), 0.3: result(0.9, 0.9, 0.6), 0.03: result(0.2, 0.9, 1.0)}) == 0.1
    # ties on subjects found go to the subject's parts, then to the lower rate
    assert learning.choose_rate({0.1: result(0.0, 0.4, 0.9), 0.3: result(0.0, 0.6, 0.8)}) == 0.3
    assert learning.choose_rate({0.3: result(0.0, 0.6, 0.8), 0.1: result(0.0, 0.6, 0.9)}) == 0.1
    # no rate keeps scenes: the one that keeps them best
    assert learning.choose_rate({0.1: result(0.0, 0.4, 0.5), 0.3: result(0.9, 0.9, 0.2)}) == 0.1


def test_every_method_has_a_toy_config_on_the_toy_model():
    for method in METHODS:
        config = read_yaml_mapping(learning.CONFIGS / learning.config_name(method))
        assert config["method"] == method and config["pretrained_model_name_or_path"] == "builtin:toy-sd"
        assert config["max_train_steps"] == 600 and config["train_batch_size"] == 1 and config["with_prior_preservation"]
        assert learning.config_rate(method) > METHODS[method].dreambooth_lr  # the toy world's rates are higher


def test_bad_methods_and_subjects_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--methods: unknown method 'dora'"):
        learning.parse_args(["--output_dir", str(tmp_path), "--methods", "ether+,dora"])
    with pytest.raises(UserError, match="--subjects: unknown subject 'dog'"):
        learning.parse_args(["--output_dir", str(tmp_path), "--subjects", "dog"])
    args = learning.parse_args(["--output_dir", str(tmp_path), "--methods", "lora, hra", "--subjects", "star_toy"])
    assert args.methods == ["lora", "hra"] and args.subjects == ["star_toy"]


def test_the_table_shows_the_base_models_rows_and_the_look_in_words():
    cells = {"subject": 0.0, "subject_parts": 0.36, "scene": 1.0, "subject_in_scenes": 0.0, "other_toys": 1.0}
    base = {"subjects": {"star_toy": cells}, "look_in_words": {"star_toy": {"subject": 0.25, "subject_parts": 0.5}}}
    run = {**cells, "subject": 0.5, "learning_rate": 0.18}
    lines = learning.table(base, {("ether+", "star_toy"): run}).splitlines()
    assert lines[2:] == ["| base model | | star_toy | 0% | 36% | 100% | 0% | 100% |",
                         "| base model, the look in words | | star_toy | 25% | 50% | | | |",
                         "| ether+ | 0.18 | star_toy | 50% | 36% | 100% | 0% | 100% |"]
