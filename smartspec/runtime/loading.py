"""Loading a causal LM for serving: local folder or the embedded default, device and dtype."""

from __future__ import annotations

import platform
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
    """Loads a Hugging Face causal LM folder, offline, in eval mode, with the runner's ragged attention
    (a model family the runner cannot serve exactly is refused with a ValueError naming it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from smartspec.runtime.attention import RAGGED
    from smartspec.runtime.runner import serving_problem

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    problem = serving_problem(config)
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), config=config, dtype=resolve_dtype(dtype), attn_implementation=RAGGED, local_files_only=True
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
        device_name=device_name(param.device),
    )


def device_name(device: torch.device) -> str:
    """The device's model name (and, on a CPU, the threads torch uses): what step costs depend on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def load_runner(spec: str, role: str, device: str, dtype: str, max_sequences: int, max_context: int = 0, kv_cache_gb: float = 1.0):
    """Resolves and loads a model ('embedded' or a folder) into a BatchedRunner with a KV cache of
    `kv_cache_gb` GiB (or less, when every sequence at the context limit needs less); returns it with
    the model's wire description. max_context 0 keeps the model's own limit."""
    from smartspec.models import resolve_model_path
    from smartspec.runtime.kv_pool import BLOCK_SIZE, bytes_per_token
    from smartspec.runtime.runner import BatchedRunner, kv_shape

    path = resolve_model_path(spec, role)
    model = load_causal_lm(path, device, dtype)
    limit = min(max_context, max_context_of(model)) if max_context > 0 else max_context_of(model)
    info = describe(model, str(path))
    if kv_cache_gb <= 0:
        raise ValueError(f"--kv-cache-gb must be positive (got {kv_cache_gb})")
    per_token = bytes_per_token(*kv_shape(model.config), next(model.parameters()).dtype)
    budget = min(int(kv_cache_gb * 2**30) // per_token, max_sequences * (limit + BLOCK_SIZE))
    if budget < 2 * BLOCK_SIZE:
        raise ValueError(f"--kv-cache-gb {kv_cache_gb} holds {budget} tokens of this model: too few to serve anything")
    # A sequence can never be longer than the whole cache: the context limit says so to every client.
    limit = min(limit, budget - BLOCK_SIZE)
    info.max_context = limit
    return BatchedRunner(model, max_sequences=max_sequences, max_context=limit, kv_cache_tokens=budget), info

