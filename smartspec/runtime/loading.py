"""Loading a causal LM for serving: local folder or the embedded default, device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when available; exact greedy equality is promised for float32 only."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """Loads a Hugging Face causal LM folder, offline, in eval mode, with SDPA attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=resolve_dtype(dtype), attn_implementation="sdpa", local_files_only=True
    )
    return model.to(resolve_device(device)).eval()


def max_context_of(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def eos_ids_of(model: torch.nn.Module) -> list[int]:
    """End-of-sequence ids from the generation config (falling back to the model config)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def describe(model: torch.nn.Module, name: str) -> "common_pb2.ModelInfo":
    """The wire description of a loaded model."""
    from smartspec.wire import common_pb2

    param = next(model.parameters())
    return common_pb2.ModelInfo(
        model=name,
        vocab_size=int(model.config.vocab_size),
        max_context=max_context_of(model),
        device=str(param.device),
        dtype=str(param.dtype).removeprefix("torch."),
        eos_token_ids=eos_ids_of(model),
    )


def load_runner(spec: str, role: str, device: str, dtype: str, max_sequences: int, max_context: int = 0):
    """Resolves and loads a model ('embedded' or a folder) into a BatchedRunner; returns it with the
    model's wire description. max_context 0 keeps the model's own limit."""
    from smartspec.models import resolve_model_path
    from smartspec.runtime.runner import BatchedRunner

    path = resolve_model_path(spec, role)
    model = load_causal_lm(path, device, dtype)
    limit = min(max_context, max_context_of(model)) if max_context > 0 else max_context_of(model)
    info = describe(model, str(path))
    info.max_context = limit
    return BatchedRunner(model, max_sequences=max_sequences, max_context=limit), info
