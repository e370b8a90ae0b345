"""How a config section is declared: a documented key with an optional range, and @sections. The one schema
(pipeline.config) and the model families' own `model:` keys (pipeline.models.families) are written with these, so a
family declares its keys without importing the schema that assembles them."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field


def key(default, help: str = "", min: float | None = None, max: float | None = None, init_only: bool = False, **kw):
    """A documented field with an optional range, checked by pipeline.config.validate. `init_only`: the key only
    initialises a new model's weights (weights loaded into the model replace what it did)."""
    meta = {"help": help, "min": min, "max": max, "init_only": init_only}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def sections(cls):
    """@dataclass, where a field typed as another part of the schema (`kl: KLConfig`) defaults to that part's
    defaults."""
    hints = typing.get_type_hints(cls)
    for name in cls.__annotations__:
        if dataclasses.is_dataclass(hints[name]) and name not in vars(cls):
            setattr(cls, name, field(default_factory=hints[name]))
    return dataclasses.dataclass(cls)
