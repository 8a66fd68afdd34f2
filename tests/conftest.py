"""Shared fixtures: a tiny random chat model built once per test session (no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from ssb.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
