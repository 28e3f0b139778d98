"""The `smartspec` command. Each subcommand lives in its own module, imported only when chosen, so
client commands start fast (they never import torch or transformers)."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
from typing import NoReturn

# subcommand -> (module with add_arguments(parser) and run(args) -> int | None, one-line help)
COMMANDS = {
    "demo": ("smartspec.commands.demo", "start the stack on the embedded model, generate with and without speculation, stop"),
    "up": ("smartspec.commands.up", "start verifier, drafters and router on loopback and wait"),
    "generate": ("smartspec.commands.generate", "send one prompt to a running router"),
    "bench": ("smartspec.commands.bench", "compare speculation policies under Poisson load, side by side"),
    "simulate": ("smartspec.commands.simulate", "simulate the router's step loop on a virtual clock: every policy on the same world"),
    "models": ("smartspec.commands.models", "print (and build on first use) the embedded default model folders"),
    "health": ("smartspec.commands.health", "check a service's gRPC health (exit 0 when SERVING), e.g. for container healthchecks"),
    "serve": (None, "run one service of the stack: smartspec serve ROLE ..."),
}

# smartspec serve ROLE -> module with add_arguments(parser) and run(args)
ROLES = {
    "verifier": ("verifier_svc.main", "the target model: prefill, verify, KV cache"),
    "drafter": ("drafter_svc.main", "one proposer backend (--kind draft_model, prompt_lookup, ...)"),
    "router": ("router.main", "the client-facing front door: batching, speculation policy, streaming"),
}


def _add_module_parser(subparsers, name: str, module_name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    parser.set_defaults(_module=module, _parser=parser)  # _parser: the command's own parser, for tools that inspect its flags


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: only the command (or serve role) that argv names is fully built, so
    parsing argv checks it like `main` does without importing every command's module."""
    parser = argparse.ArgumentParser(prog="smartspec", description="Speculative decoding that stays profitable under load.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv else None
    for name, (module_name, help_text) in COMMANDS.items():
        if module_name is None:
            serve = subparsers.add_parser(name, help=help_text, description=help_text)
            roles = serve.add_subparsers(dest="role", required=True, metavar="ROLE")
            role_wanted = argv[1] if wanted == "serve" and len(argv) > 1 else None
            for role, (role_module, role_help) in ROLES.items():
                if role_wanted == role:
                    _add_module_parser(roles, role, role_module, role_help)
                else:
                    roles.add_parser(role, help=role_help)
        elif wanted == name:
            _add_module_parser(subparsers, name, module_name, help_text)
        else:
            subparsers.add_parser(name, help=help_text)  # listed in --help; its module is not imported
    return parser


def rpc_failure(err: BaseException) -> str | None:
    """'STATUS: message' when `err` is a failed call to a service (a ClientError or a gRPC error), else None."""
    if "grpc" not in sys.modules:  # no call was made
        return None
    import grpc

    from smartspec.client import ClientError

    if isinstance(err, ClientError):
        return str(err)
    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        return f"{err.code().name}: {err.details()}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A call to a service that fails and that the command did not handle itself ends
    it with exit status 1 and 'STATUS: message' on stderr, not a traceback."""
    whole_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if whole_process:
        _prepare_process(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        code = args._module.run(args)
    except Exception as err:
        failure = rpc_failure(err)
        if failure is None:
            raise
        print(failure, file=sys.stderr, flush=True)
        return 1
    if whole_process and args.command == "serve":
        _exit_stopped_service(int(code or 0))
    return int(code or 0)


def _prepare_process(argv: list[str]) -> None:
    """Before anything else in a smartspec process: it ends with a parent that asked it to (a service
    started by `up`, `bench` or `demo`; smartspec.lifeline), and a service tells OpenMP not to spin while
    idle before anything imports torch (a drafter backend does while its flags are parsed)."""
    from smartspec.lifeline import watch_parent
    from smartspec.threads import quiet_openmp

    watch_parent()
    if argv[:1] == ["serve"]:
        quiet_openmp()


def _exit_stopped_service(code: int) -> NoReturn:
    """Ends a service's process once it has stopped, skipping the interpreter's teardown of torch,
    transformers and grpc, which alone kept a stopped service alive 2.5 s more on 2 cores. Exit
    handlers (log and trace flushes) still run."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
