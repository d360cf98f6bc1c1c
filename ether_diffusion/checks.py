"""Range checks of command-line values, one wording for every tool (trainers, evaluators, `sample`).

Each takes the parsed `args` and argument names; a value of None means "not given" and passes. NaN, infinity
and integers beyond 64 bits never get here: `errors.ArgumentParser` refuses them while parsing.
"""
from .errors import UserError

SEED_LIMIT = 2**32  # numpy's seeds (which accelerate's set_seed sets) are below 2**32


def _given(args, names):
    for name in names:
        value = getattr(args, name)
        if value is not None:
            yield name, value


def at_least(args, minimum, *names):
    for name, value in _given(args, names):
        if value < minimum:
            raise UserError(f"--{name} must be at least {minimum}, got {value}")


def not_negative(args, *names):
    for name, value in _given(args, names):
        if value < 0:
            raise UserError(f"--{name} cannot be negative, got {value}")


def positive(args, *names):
    for name, value in _given(args, names):
        if value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")


def fraction_below_one(args, *names):
    """Values in [0, 1): Adam's betas (1 would never forget, above 1 diverges)."""
    for name, value in _given(args, names):
        if not 0 <= value < 1:
            raise UserError(f"--{name} must be in [0, 1), got {value}")


def fraction(args, *names):
    """Values in [0, 1]: proportions."""
    for name, value in _given(args, names):
        if not 0 <= value <= 1:
            raise UserError(f"--{name} must be in [0, 1], got {value}")


def seed(args, *names):
    for name, value in _given(args, names):
        if not 0 <= value < SEED_LIMIT:
            raise UserError(f"--{name} must be in [0, 2**32), got {value}")


def resolution(args, *names):
    """Image sizes: the VAE downsamples by 8, so a size that is not a multiple of 8 cannot round-trip."""
    for name, value in _given(args, names):
        if value <= 0 or value % 8:
            raise UserError(f"--{name} {value} is not a positive multiple of 8")
