"""The DreamBooth dataset the tests read.

`COPY` (tests/data/dreambooth: 3 subjects, 7 photos, CC-BY-4.0, see its README.md) is in the repository, so a
bare clone runs every test. Tests about the whole dataset (30 subjects, 158 photos, 750 jobs) take it from
`$ETHER_DIFFUSION_DREAMBOOTH_DIR` (`.ci/run` sets it where CI has the whole dataset); without it they check
the same things on the copy, and the end of the run lists them (`conftest.pytest_terminal_summary`).
"""
import os
from pathlib import Path

import pytest

ENV = "ETHER_DIFFUSION_DREAMBOOTH_DIR"
COPY = Path(__file__).resolve().parent / "data" / "dreambooth"
PROMPTS_FILE = "prompts_and_classes.txt"

checked_on_copy: list[str] = []  # node ids of the tests that wanted the whole dataset and got the copy


def whole_dataset(item) -> Path:
    """The whole dataset where $ETHER_DIFFUSION_DREAMBOOTH_DIR names it; else `COPY`, noted on the test `item`
    (its reports carry the note to the main process, also from `pytest -n` workers: see `note`)."""
    value = os.environ.get(ENV)
    if not value:
        item.user_properties.append(("dreambooth_copy", True))
        return COPY
    path = Path(value)
    if not (path / PROMPTS_FILE).is_file():
        pytest.fail(f"${ENV}={value} is not a DreamBooth dataset folder (it has no {PROMPTS_FILE})", pytrace=False)
    return path


def note(report):
    """Called by conftest for every report the main process sees."""
    if report.when == "call" and ("dreambooth_copy", True) in report.user_properties:
        checked_on_copy.append(report.nodeid)


def summary_lines() -> list[str]:
    if not checked_on_copy:
        return []
    return [f"${ENV} is not set: {len(checked_on_copy)} test(s) about the whole DreamBooth dataset checked the "
            f"3-subject copy in {COPY.relative_to(COPY.parents[2])} instead:", *(f"  {t}" for t in checked_on_copy)]
