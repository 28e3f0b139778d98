"""`smartspec generate`: send one prompt to a running router and print the result.

A thin shell over smartspec.client (no torch, no transformers: it starts in a fraction of a second).
It validates nothing itself, so the router's own error (e.g. `INVALID_ARGUMENT: max_tokens must be at
least 1`) is what the user sees, on stderr, with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import sys

from smartspec.config import add_flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--prompt", default=None, help="text prompt (tokenized as is, no chat template)")
    add_flag(parser, "--chat", action="store_true", default=False, help="send the prompt as one user message (the chat template is applied)")
    add_flag(parser, "--drafter", default="", help="auto, none, prompt_lookup, draft_model or tree (greedy only); empty = the router's default (auto)")
    add_flag(parser, "--policy", default="", help="speculation policy: goodput, uniform, none or fixed:K; empty = the router's default (goodput)")
    add_flag(parser, "--max-tokens", type=int, default=None, help="most tokens to generate; unset = the router's default (128)")
    add_flag(parser, "--stop", action="append", default=[], metavar="S", help="stop sequence (repeatable; env: comma-separated)")
    add_flag(parser, "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (output identical to the target model's own)")
    add_flag(parser, "--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]; unset = 1 (off)")
    add_flag(parser, "--top-k", type=int, default=0, help="sample among the K most likely tokens; 0 = off")
    add_flag(parser, "--seed", type=int, default=None, help="seed of a sampling request (same seed, drafter and fixed policy: same output); unset = random")
    add_flag(parser, "--ignore-eos", action="store_true", default=False,
             help="keep generating past end-of-sequence tokens, up to --max-tokens or a stop sequence (benchmarks with fixed lengths)")
    add_flag(parser, "--router", default="127.0.0.1:50051", help="router address HOST:PORT")
    add_flag(parser, "--timeout-s", type=float, default=None, help="deadline for the whole call, in seconds (unset = none)")
    add_flag(parser, "--tls-ca", default="", help="PEM file to check the router's TLS certificate against (its CA, or the certificate itself); empty: plaintext")
    add_flag(parser, "--auth-token", default="", help="bearer token the router requires (its --auth-token); empty: none")
    add_flag(parser, "--json", action="store_true", default=False, help="print one JSON object: token_ids, text, finish_reason, stats")
    add_flag(parser, "--stream", action="store_true", default=False, help="print text as it arrives")


def run(args: argparse.Namespace) -> int:
    from smartspec.client import Client, ClientError, Completion

    options = {
        "max_tokens": args.max_tokens, "stop": args.stop, "drafter": args.drafter, "policy": args.policy,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
        "ignore_eos": args.ignore_eos,
    }
    if args.chat:
        options["messages"] = [{"role": "user", "content": args.prompt or ""}]
        prompt = None
    else:
        prompt = args.prompt
    try:
        with Client(args.router, timeout_s=args.timeout_s, tls_ca=args.tls_ca or None, auth_token=args.auth_token or None) as client:
            if args.stream:
                result = _stream(client, prompt, options, echo=not args.json)
            else:
                result = client.generate(prompt, **options)
    except ClientError as err:
        if args.stream and not args.json:
            print(flush=True)
        print(f"{err.status}: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
    else:
        if not args.stream:
            sys.stdout.write(result.text)
        print(flush=True)
        s = result.stats
        print(
            f"[finish={result.finish_reason} tokens={len(result.token_ids)} steps={s['steps']} "
            f"proposed={s['proposed']} accepted={s['accepted']} total={s['total_s']:.2f}s"
            + (f" seed={s['seed']}" if s.get("seed") else "") + "]",
            file=sys.stderr,
        )
    return 0


def _stream(client, prompt, options, echo: bool) -> "Completion":
    """Streams, echoing text as it arrives; returns the same Completion a unary call would."""
    from smartspec.client import Completion

    token_ids: list[int] = []
    text: list[str] = []
    for chunk in client.generate_stream(prompt, **options):
        token_ids.extend(chunk.token_ids)
        text.append(chunk.text)
        if echo and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if chunk.finish_reason is not None:
            return Completion(token_ids, "".join(text), chunk.finish_reason, chunk.stats or {})
    from smartspec.client import ClientError

    raise ClientError("UNKNOWN", "the stream ended without a finish reason")
