"""argparse `type=` callables shared by the training command lines.

Why: a value checked by argparse is reported against the flag the user typed (`argument --items:
must be a positive integer, got '0'`), not against an internal parameter name deep in a job.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value
