"""CPU threads of the stack's torch processes: how many each gets, and no busy-waiting when idle.

By default every torch process starts one OpenMP thread per core, so a verifier and two draft-model
drafters on one machine each use every core, and OpenMP's worker threads spin between parallel regions
(about a core for every second a process idles between small products, measured on 2 cores). Spinning
burns the cores the busy process needs, and beside another CPU-heavy process a spinning thread waits
for a peer that is not running: on 2 cores the demo ran at 0.5-1 token/s instead of ~28.

- `smartspec up` sizes each service with `plan_threads` and passes it as `--threads N`, which the
  service applies with `configure_threads`;
- `up` (for its children) and every `smartspec serve` process (for itself, before torch is imported)
  set OMP_WAIT_POLICY=PASSIVE unless the user set it: torch's OpenMP runtime (libgomp) then puts
  waiting threads to sleep instead of spinning.

A user's own OMP_NUM_THREADS / MKL_NUM_THREADS (or SMARTSPEC_THREADS) wins: `up` then passes no
`--threads`, and a service without `--threads` keeps what the variable says.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, MutableMapping, Sequence

from smartspec.config import add_flag

# Variables by which a user sizes OpenMP / MKL thread pools (and the services' own --threads).
USER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SMARTSPEC_THREADS")
WAIT_POLICY = "OMP_WAIT_POLICY"
# The drafters that run the draft model (--draft-model); the others (prompt lookup) need one thread.
MODEL_DRAFTERS = frozenset({"draft_model", "tree"})


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """--threads of a service that runs a model."""
    add_flag(parser, "--threads", type=int, default=0,
             help="torch CPU threads of this process (0: OMP_NUM_THREADS when set, else one per core); `smartspec up` sets it")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def user_sized(env: Mapping[str, str]) -> bool:
    """Whether the user chose thread counts through the environment (then `up` leaves them alone)."""
    return any(env.get(name) for name in USER_THREAD_VARIABLES)


def plan_threads(cores: int, verifiers: Sequence[str], drafters: Sequence[str]) -> dict[str, int]:
    """Threads per role so that the processes busy at the same moment fit `cores`, the verifier most.

    The router drafts, then verifies, in every step: the drafters run while the verifiers wait and the
    other way round, so the verifiers share every core, and so do the model drafters (a step may ask
    draft_model and tree at once). Verifier replicas run at the same time (one Verify each per step).
    A model drafter never gets more than a verifier. Prompt lookup is plain Python: one thread. Every
    process gets at least one thread.
    """
    cores = max(1, cores)
    per_verifier = max(1, cores // max(1, len(verifiers)))
    plan = dict.fromkeys(verifiers, per_verifier)
    models = [kind for kind in drafters if kind in MODEL_DRAFTERS]
    for kind in drafters:
        plan[kind] = min(per_verifier, max(1, cores // len(models))) if kind in MODEL_DRAFTERS else 1
    return plan


def quiet_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with OMP_WAIT_POLICY=PASSIVE unless it sets a wait policy itself."""
    return dict(env) if env.get(WAIT_POLICY) else {**env, WAIT_POLICY: "PASSIVE"}


def quiet_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets OMP_WAIT_POLICY=PASSIVE in this process unless the user set a policy. Only takes effect
    before torch is imported: OpenMP reads its variables once, when it loads."""
    if not environ.get(WAIT_POLICY):
        environ[WAIT_POLICY] = "PASSIVE"


def configure_threads(threads: int, environ: MutableMapping[str, str] = os.environ) -> None:
    """Applies a service's --threads (0: leave the count to OMP_NUM_THREADS or torch) and the passive
    wait policy (`quiet_openmp`). The count is set through torch too when torch is already loaded."""
    quiet_openmp(environ)
    if threads <= 0:
        return
    environ["OMP_NUM_THREADS"] = environ["MKL_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
