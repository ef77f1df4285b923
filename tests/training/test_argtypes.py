from __future__ import annotations

import argparse

import pytest

from training.argtypes import positive_int


def test_positive_int_accepts_one_and_more() -> None:
    assert positive_int("1") == 1
    assert positive_int("250") == 250


@pytest.mark.parametrize(
    ("text", "message"), [("0", "positive integer, got '0'"), ("x", "whole number, got 'x'")]
)
def test_positive_int_refuses_zero_and_non_numbers_with_the_text(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive_int(text)
