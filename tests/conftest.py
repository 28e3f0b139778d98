"""Shared fixtures: the embedded models, seeded tiny models, greedy references, in-process servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import build_tiny_model


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2 target and its derived draft (converted once into the user's cache)."""
    from smartspec.models import embedded_paths

    return embedded_paths()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory, embedded) -> Path:
    """A seeded random-init 2-layer Llama with the embedded tokenizer (fast; varied greedy output)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_target"), embedded.target, seed=0, layers=2)


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory, embedded) -> Path:
    """Another seeded tiny Llama (1 layer, different weights): a draft that is often wrong."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_draft"), embedded.target, seed=1, layers=1)
