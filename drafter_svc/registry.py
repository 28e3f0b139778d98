"""Drafter backends by name: the ``smartspec.drafters`` entry-point group, or ``package.module:ClassName``.

A package adds a backend by declaring, in its own pyproject.toml::

    [project.entry-points."smartspec.drafters"]
    my_kind = "my_package.my_module:MyDrafter"

The built-ins are declared the same way in smartspec's pyproject.toml.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from drafter_svc.base import Drafter

GROUP = "smartspec.drafters"

# The built-ins as pyproject.toml declares them (a test keeps the two equal). Used only when the
# installed metadata predates the entry points (an editable install not re-run since), so a source
# checkout works either way.
BUILTINS = {
    "prompt_lookup": "drafter_svc.prompt_lookup:PromptLookupDrafter",
    "draft_model": "drafter_svc.draft_model:DraftModelDrafter",
    "tree": "drafter_svc.tree:TreeDrafter",
}


def available() -> dict[str, str]:
    """Registered kind -> 'module:Class', built-ins first."""
    found = dict(BUILTINS)
    found.update({ep.name: ep.value for ep in entry_points(group=GROUP)})
    return found


def _import(target: str) -> object:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{target!r} is not of the form package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import drafter module {module_name!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def load(kind: str) -> type[Drafter]:
    """The backend class for a registered name or a 'package.module:ClassName' reference."""
    if ":" in kind:
        target = kind
    else:
        registered = available()
        if kind not in registered:
            raise ValueError(f"unknown drafter kind {kind!r}; registered: {', '.join(sorted(registered))} (or give package.module:ClassName)")
        target = registered[kind]
    cls = _import(target)
    if not (isinstance(cls, type) and issubclass(cls, Drafter)):
        raise ValueError(f"{target!r} is not a subclass of drafter_svc.base.Drafter")
    if not isinstance(getattr(cls, "kind", None), str) or not cls.kind:
        raise ValueError(f"{target!r} does not set the class attribute `kind` (its registered name)")
    return cls
