"""The table of user mistakes the test suite shows are handled (`docs/user_errors.md`), made from the tests.

Mark a test, or one `pytest.param` of a parametrized test, with
`@pytest.mark.user_error("what the user did wrong", tool="train_dreambooth.py")`. The error line the test
checked is recorded with `record(line)` (`trainer_helpers.fails` does it, and `refused`, the `pytest.raises`
of library calls, does it too). `make user-errors-table` runs the
marked tests and rewrites the table from what passed: a row per case, the tool, the mistake, the line the
user sees, and the test that shows it.
"""
import contextlib
import os
import re
from pathlib import Path

import pytest

from ether_diffusion.errors import UserError

_lines: dict[str, list[str]] = {}  # test node id -> error lines it checked
_rows: list[tuple[str, str, str, str]] = []


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]


def record(line: str) -> str:
    """Remember `line` as what the current test's user saw; returns it."""
    _lines.setdefault(_current_test(), []).append(line)
    return line


def case(*values, tool: str):
    """One `pytest.param` of a parametrized test that shows a handled mistake, the mistake last:
    `case(argv, message, "--seed -1", tool="evaluate/s2i.py")`; marked for the table and named by the mistake."""
    *values, mistake = values
    return pytest.param(*values, marks=pytest.mark.user_error(mistake, tool=tool), id=mistake.replace("`", ""))


@contextlib.contextmanager
def refused(match: str | None = None):
    """`pytest.raises(UserError, match=match)` for a library call: the error must be one line, and is recorded
    as the line a command-line user would see (`error: ...`)."""
    with pytest.raises(UserError, match=match) as info:
        yield info
    assert "\n" not in str(info.value), str(info.value)
    record(f"error: {info.value}")


def collect(item, report):
    """Called by conftest for every test phase, where the test ran: a passed marked test gets a row per marker,
    carried on its report (so `pytest -n` workers hand it to the main process, see `rows_of`)."""
    if report.when != "call" or not report.passed:
        return
    for marker in item.iter_markers("user_error"):
        mistake = marker.args[0] if marker.args else item.name
        lines = _lines.get(item.nodeid, [])
        report.user_properties.append(("user_error", (marker.kwargs.get("tool", ""), mistake,
                                                      lines[-1] if lines else "", item.nodeid)))


def rows_of(report):
    """Called by conftest for every report the main process sees: keeps its rows for the table."""
    _rows.extend(tuple(value) for key, value in report.user_properties if key == "user_error")


def write_table(path):
    rows = sorted(set(_rows))
    out = ["# User mistakes handled", "",
           "Made from the test suite by `make user-errors-table` (`tests/user_errors.py`): one row per case a test",
           "shows is handled with a one-line error (exit code 2), a fallback or a correct result. The line is what",
           "the test checked the user sees (empty where the outcome is not an error, e.g. a fallback).", "",
           f"Cases: {len(rows)}.", "",
           "| tool | mistake | what the user sees | test |", "|---|---|---|---|"]
    for tool, mistake, line, node in rows:
        # pytest's temporary folders differ on every run: <tmp> keeps the table stable
        cell = re.sub(r"\S*/pytest-of-[^/]+/pytest-\d+/[^/\s]+", "<tmp>", line).replace("|", "\\|")
        out.append(f"| {tool} | {mistake} | `{cell}` | `{node.replace('|', '/')}` |" if cell else
                   f"| {tool} | {mistake} | | `{node.replace('|', '/')}` |")
    Path(path).write_text("\n".join(out) + "\n")
