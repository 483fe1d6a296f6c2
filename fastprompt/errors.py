"""Typed errors. Each carries one line a user can act on; the CLI prints it and exits with code 2."""
import argparse


class FastpromptError(Exception):
    """Base class: an input problem the user can fix (not a bug in fastprompt)."""


class TemplateError(FastpromptError, ValueError):
    """The template is malformed or does not fit the data or the model."""


class DataError(FastpromptError, ValueError):
    """A dataset file or an example is malformed."""


class ModelError(FastpromptError, OSError):
    """A model or tokenizer could not be loaded."""


class PromptFileError(FastpromptError, ValueError):
    """A saved prompt or checkpoint is unreadable or was made for another model."""


class ConfigError(FastpromptError, ValueError):
    """An option has an unknown or out-of-range value."""


class OutputError(FastpromptError, OSError):
    """An output could not be written (no space, a read-only file system): the path and the reason."""


class NonFiniteError(FastpromptError, FloatingPointError):
    """Training produced NaN/inf losses or gradients several steps in a row (the CLI exits with code 3)."""


class UsageParser(argparse.ArgumentParser):
    """argparse whose usage errors are a ``ConfigError``: one ``error:`` line and exit code 2, like every
    other bad input (plain argparse prints the whole usage block)."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed and torch.Generator take


def check_seed(seed: int) -> int:
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"--seed must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {seed}")
    return seed


def exit_code(job, *args) -> int:
    """Run ``job(*args)`` for a command-line entry point: 0, or 2 with one ``error:`` line on stderr for
    an input problem (a ``FastpromptError``) instead of a traceback."""
    import sys

    try:
        job(*args)
    except FastpromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
