"""Test helpers: tiny models, greedy references from transformers, servers on background threads."""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Callable, Sequence

import torch


def build_tiny_model(dest: Path, tokenizer_from: Path, seed: int, layers: int, max_positions: int = 512) -> Path:
    """Saves a seeded random-init Llama that shares the tokenizer at `tokenizer_from`.

    initializer_range=0.5: at the default 0.02 a random model repeats one token under greedy, which
    would make lossless tests nearly unable to fail.
    """
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=False)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


_MODELS: dict[str, torch.nn.Module] = {}


def reference_model(model_path: Path) -> torch.nn.Module:
    """The model as transformers loads it by default (float32, its own attention implementation), once
    per folder: what every exactness test compares against."""
    from transformers import AutoModelForCausalLM

    key = str(model_path)
    if key not in _MODELS:
        _MODELS[key] = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return _MODELS[key]


def reference_greedy(model_path: Path, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' own greedy decoding of `prompt` (up to `new_tokens`, ending early at an
    end-of-sequence token as generate does): the tokens, and the top-2 logit gap at each position
    (a mismatch where the gap is below 1e-4 is a numeric tie, not a bug)."""
    model = reference_model(model_path)
    ids = torch.tensor([list(prompt)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    gaps = [float((s[0].topk(2).values[0] - s[0].topk(2).values[1])) for s in out.scores]
    return tokens, gaps


def first_mismatch(got: Sequence[int], want: Sequence[int], gaps: Sequence[float]) -> str | None:
    """None when equal; else a message naming the first differing position and the reference's top-2 gap."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            tie = " (numeric tie)" if gaps[i] < 1e-4 else ""
            return f"position {i}: got {a}, reference {b}, reference top-2 logit gap {gaps[i]:.2e}{tie}"
    if len(got) != len(want):
        return f"length {len(got)} != reference length {len(want)}"
    return None


def assert_lossless(got: Sequence[int], want: Sequence[int], gaps: Sequence[float], label: str = "") -> None:
    """Equal to the reference, except that a difference is tolerated at a numeric tie (top-2 gap < 1e-4):
    where the batch a request ran in depends on timing, float rounding may pick the other of two tied
    tokens, and past that the texts rightly differ."""
    problem = first_mismatch(list(got), want, gaps)
    if problem is None:
        return
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert i is not None and gaps[i] < 1e-4, f"{label}: {problem}" if label else problem


class ServerThread:
    """Runs an aio gRPC server (smartspec.serving.start_server) on its own event loop in a thread,
    so tests can talk to it over real loopback with plain synchronous stubs."""

    def __init__(self, register: Callable, service_names: Sequence[str], tracing=None, host: str = "127.0.0.1", port: int = 0) -> None:
        from smartspec.serving import start_server

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.running = self.call(start_server(register, service_names, host, port, tracing))
        self.address = self.running.address

    def call(self, coroutine):
        """Runs a coroutine on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=120)

    def stop(self) -> None:
        """Stops the server and its loop; calling it again does nothing."""
        if not self._thread.is_alive():
            return
        self.call(self.running.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X chi-square with `dof` degrees of freedom: the regularized upper
    incomplete gamma Q(dof / 2, statistic / 2) (series below a + 1, Lentz's continued fraction above)."""
    import math

    a, x = dof / 2.0, statistic / 2.0
    if x <= 0:
        return 1.0
    log_prefactor = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h * math.exp(log_prefactor)


def goodness_of_fit(observed: dict, expected: dict, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's chi-square test of observed counts against expected probabilities (outcome ->
    probability, summing to 1). Outcomes expected fewer than `min_expected` times are pooled into one
    bin, as are observed outcomes outside `expected` (which a correct sampler never produces).
    Returns (statistic, degrees of freedom, p-value)."""
    n = sum(observed.values())
    bins: list[tuple[float, float]] = []  # (observed, expected count)
    pooled_obs = float(sum(count for outcome, count in observed.items() if outcome not in expected))
    pooled_exp = 0.0
    for outcome, prob in expected.items():
        if prob * n >= min_expected:
            bins.append((observed.get(outcome, 0), prob * n))
        else:
            pooled_obs += observed.get(outcome, 0)
            pooled_exp += prob * n
    if pooled_exp > 0 or pooled_obs > 0:
        bins.append((pooled_obs, max(pooled_exp, 1e-12)))
    statistic = sum((o - e) ** 2 / e for o, e in bins)
    dof = max(1, len(bins) - 1)
    return statistic, dof, chi_square_sf(statistic, dof)


# --- decoder families -------------------------------------------------------------------------------
# Per family: (config class, model class, settings beyond the common tiny shape). What a family does
# differently from Llama stays at its default (Gemma 2's attention and final logit soft-capping, Gemma's
# query_pre_attn_scalar of 256 against a head_dim of 16, Qwen3's and OLMo-2's q/k norms, Phi-3's fused
# qkv_proj, Qwen2's q/k/v biases), and sliding windows are cut to 16 tokens so that a 40-token context
# crosses them. Gemma 3 gets one sliding and one global layer (its default pattern would make both
# layers sliding), so both of its RoPE bases are used. Gemma's embeddings are untied: tied, its
# sqrt(hidden)-scaled input embedding dominates the residual of a random model, whose greedy output
# then repeats the last prompt token forever.
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 16, "tie_word_embeddings": False}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": False},
    ),
}


@functools.cache
def _tokenizer(path: Path):
    """A tokenizer loaded once per folder: loading it costs more than building a tiny model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_family_model(dest: Path, family: str, tokenizer_from: Path, seed: int) -> Path:
    """Saves a seeded random-init 2-layer model of `family` (a key of FAMILIES) with transformers' own
    classes, sharing the tokenizer at `tokenizer_from`: hidden 64, 4 query and 2 key/value heads,
    initializer_range 0.5 (as in build_tiny_model, so greedy output varies)."""
    import transformers
    from transformers import GenerationConfig

    config_name, model_name, settings = FAMILIES[family]
    tokenizer = _tokenizer(Path(tokenizer_from))
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=False)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
