"""The committed stubs are exactly what the proto files generate (they are never edited by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto_files(tmp_path):
    generated = _load_generator().generate(tmp_path)
    assert generated, "no stubs were generated"
    stale = []
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(path.relative_to(tmp_path)))
    committed_stubs = {p.relative_to(ROOT) for p in (ROOT / "smartspec" / "wire").glob("*_pb2*.py*")}
    orphans = committed_stubs - {p.relative_to(tmp_path) for p in generated}
    assert not stale and not orphans, f"stale stubs {stale}, orphans {sorted(map(str, orphans))}: run python scripts/gen_proto.py"


def test_every_field_and_enum_value_is_documented():
    """A comment on every field: the proto is the contract other teams read."""
    undocumented = []
    for proto in (ROOT / "proto").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax", "//"))
            if is_field and not lines[i - 1].strip().startswith("//") and not stripped.split()[0].endswith("_UNSPECIFIED"):
                undocumented.append(f"{proto.name}:{i + 1}: {stripped}")
    assert not undocumented, "fields without a comment:\n" + "\n".join(undocumented)


def test_enums_are_prefixed_with_their_type_name():
    from smartspec.wire import drafter_pb2, router_pb2

    for enum in (*drafter_pb2.DESCRIPTOR.enum_types_by_name.values(), *router_pb2.DESCRIPTOR.enum_types_by_name.values()):
        prefix = "".join("_" + c if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
        assert all(v.name.startswith(prefix) for v in enum.values), (enum.name, [v.name for v in enum.values])
