"""Threads sized to the machine: how `smartspec up` shares the cores between its torch processes, that a
service's --threads (or the user's OMP_NUM_THREADS) is what torch uses, and that idle OpenMP threads
sleep instead of spinning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from smartspec.cli import build_parser
from smartspec.commands.up import service_argvs, stack_options
from smartspec.threads import USER_THREAD_VARIABLES, WAIT_POLICY, plan_threads, quiet_env

DRAFTERS = ["draft_model", "prompt_lookup", "tree"]


def _threads(argv: list[str]) -> int | None:
    return int(argv[argv.index("--threads") + 1]) if "--threads" in argv else None


@pytest.mark.parametrize(
    "cores, verifiers, expected",
    [
        (2, ["verifier"], {"verifier": 2, "draft_model": 1, "tree": 1, "prompt_lookup": 1}),
        (8, ["verifier"], {"verifier": 8, "draft_model": 4, "tree": 4, "prompt_lookup": 1}),
        (8, ["verifier", "verifier2"], {"verifier": 4, "verifier2": 4, "draft_model": 4, "tree": 4, "prompt_lookup": 1}),
        (1, ["verifier"], {"verifier": 1, "draft_model": 1, "tree": 1, "prompt_lookup": 1}),
    ],
)
def test_plan_gives_the_verifier_most_and_fits_what_runs_at_once(cores, verifiers, expected):
    assert plan_threads(cores, verifiers, DRAFTERS) == expected


def test_plan_fits_the_cores_for_any_machine_and_stack():
    """Verifier replicas run together and so may the model drafters (never with the verifiers: the router
    drafts, then verifies): each group fits the cores (one thread each at least), the verifier gets most."""
    for cores in range(1, 65):
        for verifiers in (["verifier"], ["verifier", "verifier2"], ["verifier", "verifier2", "verifier3"]):
            for drafters in ([], ["prompt_lookup"], ["draft_model"], DRAFTERS):
                plan = plan_threads(cores, verifiers, drafters)
                models = [plan[k] for k in drafters if k in ("draft_model", "tree")]
                assert all(n >= 1 for n in plan.values())
                assert sum(plan[v] for v in verifiers) <= max(cores, len(verifiers))
                assert sum(models) <= max(cores, len(models))
                assert all(plan[v] >= n for v in verifiers for n in models)
                assert plan.get("prompt_lookup", 1) == 1


def test_up_passes_each_service_its_threads(monkeypatch):
    for name in USER_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    argvs = service_argvs(stack_options(cores=6), "target", "draft")
    assert {role: _threads(argv) for role, argv in argvs.items()} == {"verifier": 6, "draft_model": 3, "tree": 3, "prompt_lookup": 1}
    for role, argv in argvs.items():  # every service accepts the flag
        assert build_parser(argv).parse_args(argv).threads == _threads(argv), role


@pytest.mark.parametrize("variable", USER_THREAD_VARIABLES)
def test_up_leaves_thread_counts_to_a_user_who_set_them(monkeypatch, variable):
    monkeypatch.setenv(variable, "3")
    assert all(_threads(argv) is None for argv in service_argvs(stack_options(), "target", "draft").values())


def test_children_run_with_the_passive_wait_policy_unless_the_user_chose_one():
    assert quiet_env({"PATH": "/bin"}) == {"PATH": "/bin", WAIT_POLICY: "PASSIVE"}
    assert quiet_env({WAIT_POLICY: "ACTIVE"}) == {WAIT_POLICY: "ACTIVE"}


PROBE = """
import json, os, sys
from smartspec.threads import configure_threads
if sys.argv[1] == "after-import":
    import torch
configure_threads(int(sys.argv[2]))
import torch
print(json.dumps({"threads": torch.get_num_threads(), "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def _probe(mode: str, threads: int, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (*USER_THREAD_VARIABLES, WAIT_POLICY)}
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(threads)], capture_output=True, text=True, timeout=120, env={**clean, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_services_threads_flag_is_what_torch_uses():
    assert _probe("before-import", 1) == {"threads": 1, "policy": "PASSIVE"}
    assert _probe("after-import", 1)["threads"] == 1  # set through torch when it is already loaded
    assert _probe("before-import", 0, OMP_NUM_THREADS="1") == {"threads": 1, "policy": "PASSIVE"}  # the user's variable
    assert _probe("before-import", 1, OMP_WAIT_POLICY="ACTIVE")["policy"] == "ACTIVE"  # the user's policy


IDLE = """
import json, sys, time
from smartspec.threads import configure_threads
configure_threads(2)
import torch
a = torch.randn(256, 256)
busy = slept = 0.0
for _ in range(100):
    a @ a  # a parallel region: OpenMP's worker threads wake up
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(0.003)  # idle: the workers must sleep, not spin
    busy += time.process_time() - cpu
    slept += time.perf_counter() - wall
print(json.dumps({"busy": busy, "slept": slept}))
"""


def test_idle_openmp_threads_sleep_instead_of_spinning():
    clean = {k: v for k, v in os.environ.items() if k not in (*USER_THREAD_VARIABLES, WAIT_POLICY)}
    done = subprocess.run([sys.executable, "-c", IDLE], capture_output=True, text=True, timeout=120, env=clean)
    assert done.returncode == 0, done.stderr
    times = json.loads(done.stdout)
    # spinning workers burn about a core for every second the main thread sleeps (measured: ~0.9)
    assert times["busy"] < 0.25 * times["slept"], times
