"""One exception type for user mistakes.

Library code raises `UserError` for anything a user can fix (a wrong path, a bad value, a mismatched
adapter file). Command-line entry points parse with `ArgumentParser` and run `main` through `run_cli`,
which prints one line with exit code 2, so a user never sees a traceback for their own mistake, while
programming errors still show one.
"""
import argparse
import sys


class UserError(Exception):
    """A mistake in the user's input: the message names the file, value or layer."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are `UserError`s: one line naming the problem, no usage dump, exit code 2
    through `run_cli`. Every command line here (trainers, sample, evaluators, export) uses it."""

    def error(self, message):
        raise UserError(message)


def first_line(error) -> str:
    """Library errors often span lines (hub hints, causes); a user's error is one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def run_cli(main, argv=None):
    """Call `main(argv)`; turn a `UserError` into `error: <message>` on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
