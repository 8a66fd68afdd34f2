"""Every docstring example in the package runs and holds (ssb.metrics has its own, in test_metrics)."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["ssb.distill.store", "ssb.stages.grpo", "ssb.stages.curate", "ssb.data.arith"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted >= 1 and result.failed == 0
