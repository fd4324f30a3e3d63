"""Settings are owned by the class they act in: its defaults are its own (a dataclass field's or an
``__init__`` parameter's) and its checks are its ``SETTING_RULES``. A flat face over several owners (the
replica's ``ReplicaConfig``, whose fields are the Serve YAML's ``args:``) reads both from here instead
of restating them."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

Rules = dict[str, tuple[Callable[[object], bool], str]]  # setting -> (accepts the value?, what it must be)

POSITIVE = (lambda v: v > 0, "must be > 0")


def default_of(owner, name: str):
    """The default ``owner`` (a dataclass, or a class whose ``__init__`` takes ``name``) gives ``name``."""
    if dataclasses.is_dataclass(owner):
        field = next(f for f in dataclasses.fields(owner) if f.name == name)
        if field.default is dataclasses.MISSING:
            raise ValueError(f"{owner.__name__}.{name} has no plain default")
        return field.default
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise ValueError(f"{owner.__name__}({name}=...) has no default")
    return default


def setting_problems(rules: Rules, values: dict, names: dict[str, str] | None = None) -> list[str]:
    """Each value its owner's rule refuses, as ``name=value (what it must be)``; ``names`` renames the
    owner's settings to the face's (e.g. ``ttl_s`` -> ``depth_ttl_s``)."""
    names = names or {}
    return [f"{names.get(k, k)}={values[k]!r} ({why})" for k, (ok, why) in rules.items()
            if k in values and not ok(values[k])]


def check(owner_name: str, rules: Rules, values: dict) -> None:
    """Raises ``ValueError`` naming every refused value (what an owner's constructor calls)."""
    bad = setting_problems(rules, values)
    if bad:
        raise ValueError(f"invalid {owner_name} settings: " + ", ".join(bad))
