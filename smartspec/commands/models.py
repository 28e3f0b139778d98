"""`smartspec models`: where the target and draft model folders are (converting the embedded default once)."""

from __future__ import annotations

import argparse
import json

from smartspec.config import add_flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--target-model", default="embedded", help="target model folder, or 'embedded'")
    add_flag(parser, "--draft-model", default="embedded", help="draft model folder, or 'embedded'")
    add_flag(parser, "--json", action="store_true", default=False, help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from smartspec.models import resolve_model_path

    target = resolve_model_path(args.target_model, "target")
    draft = resolve_model_path(args.draft_model, "draft")
    if args.json:
        print(json.dumps({"target": {"path": str(target)}, "draft": {"path": str(draft)}}))
    else:
        print(f"target: {target}\ndraft:  {draft}")
    return 0
