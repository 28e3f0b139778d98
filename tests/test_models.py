"""The embedded default models: built once, atomically, and loadable by plain transformers offline."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smartspec import models


def test_models_json_gives_folders_plain_transformers_loads_offline(embedded):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = subprocess.run([sys.executable, "-m", "smartspec.cli", "models", "--json"], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    paths = json.loads(out.stdout)
    assert set(paths) == {"target", "draft"} and all(set(v) == {"path"} for v in paths.values())
    target, draft = Path(paths["target"]["path"]), Path(paths["draft"]["path"])
    assert (target, draft) == (embedded.target, embedded.draft)

    target_config, draft_config = AutoConfig.from_pretrained(target), AutoConfig.from_pretrained(draft)
    assert target_config.num_hidden_layers == 30 and draft_config.num_hidden_layers == models.DRAFT_LAYERS
    model = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32)
    generation = model.generation_config
    assert not generation.do_sample and generation.repetition_penalty in (None, 1.0)
    assert generation.temperature in (None, 1.0) and generation.top_k in (None, 50, 0) and generation.top_p in (None, 1.0)
    # the draft shares the target's tokenizer and its embedding weights
    assert AutoTokenizer.from_pretrained(draft).get_vocab() == AutoTokenizer.from_pretrained(target).get_vocab()
    from safetensors import safe_open

    with safe_open(target / "model.safetensors", "pt") as f:
        target_embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(model.model.embed_tokens.weight, target_embed)


def _build_slowly(dest: str, counter: str) -> None:
    def build(tmp: Path) -> None:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        (tmp / "config.json").write_text("{}")

    models._build_once(Path(dest), build)


def test_concurrent_first_use_builds_once_and_atomically(tmp_path):
    dest, counter = tmp_path / "model", tmp_path / "count"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(dest), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert counter.read_text().count("built") == 1
    assert (dest / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no half-built leftovers


def test_a_local_folder_replaces_the_embedded_one(tiny_target):
    assert models.resolve_model_path(str(tiny_target), "target") == tiny_target
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        models.resolve_model_path("HuggingFaceTB/SmolLM2-135M", "target")
