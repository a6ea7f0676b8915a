"""benchmarks/decode_step.py's launch-setting variants: parsed, and refused with the reason (its timings need CUDA)."""

import argparse

import pytest

from conftest import load_benchmark


def load_script():
    return load_benchmark("decode_step")


def test_a_variant_is_constants_of_the_decode_module_as_literals():
    script = load_script()
    variant = script.parse_variant('PREFETCH_LAUNCH={"input": (32, 8), "output": (8, 4), "head": (16, 4)}; '
                                   "BLOCK_K_BYTES=1024")
    assert variant == {"PREFETCH_LAUNCH": {"input": (32, 8), "output": (8, 4), "head": (16, 4)},
                       "BLOCK_K_BYTES": 1024}
    assert script.describe({"BLOCK_K_BYTES": 1024}) == "`BLOCK_K_BYTES = 1024`"


@pytest.mark.parametrize("text, reason", [
    ("NO_SUCH_SETTING=1", "not NAME=VALUE for a constant"),
    ("decode_step=1", "not NAME=VALUE for a constant"),  # a function, not a constant
    ("BLOCK_K_BYTES", "not NAME=VALUE for a constant"),
    ("BLOCK_K_BYTES=2 ** 10", "not a Python literal"),
    (" ; ", "an empty variant"),
])
def test_a_bad_variant_is_refused_with_the_reason(text, reason):
    with pytest.raises(argparse.ArgumentTypeError, match=reason):
        load_script().parse_variant(text)
