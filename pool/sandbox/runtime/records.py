"""Plain data classes for the sandbox runtime, without importing `dataclasses` at run time.

`dataclasses` brings `inspect` (and with it `dis`, `ast`, `tokenize`, `enum` helpers) and
the type checker's `typing`: about 2 MB of a zygote's 8 MB of private memory and two dozen
of its mappings, which every fork copies the page tables of and every run's exit tears
down again (bench/sandbox_cost.py). `record` builds the same `__init__`, `__repr__` and
`__eq__` from the annotations; the type checker sees `dataclasses.dataclass` itself, so
both agree on every signature. Supported: fields with or without a default,
`field(default_factory=...)`, `ClassVar` annotations (not fields), inheritance.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass as record
    from dataclasses import field
    from typing import Any

_MISSING = object()


class _Factory:
    """A field's default_factory, until `record` turns it into a default made per instance."""

    __slots__ = ("make",)

    def __init__(self, make: Any) -> None:
        self.make = make


if not TYPE_CHECKING:
    def field(*, default_factory: Any) -> Any:
        """A field whose default is made per instance (a list, a dict)."""
        return _Factory(default_factory)

    def record(cls: Any) -> Any:
        """`cls` with the __init__, __repr__ and __eq__ a dataclass would have."""
        # As dataclasses: the fields of record bases first (a redefined one keeps its
        # place), then this class's own annotations, whose default is looked up on the class.
        found: dict[str, Any] = {}
        for base in cls.__mro__[-1:0:-1]:
            found.update(vars(base).get("__record_defaults__", {}))
        for name, annotation in vars(cls).get("__annotations__", {}).items():
            if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            found[name] = getattr(cls, name, _MISSING)
        names = list(found)
        defaults = {name: default for name, default in found.items() if default is not _MISSING}
        params, body = [], []
        namespace: dict[str, Any] = {"_MISSING": _MISSING}
        for name in names:
            default = defaults.get(name, _MISSING)
            if default is _MISSING:
                if any(other in defaults for other in names[:names.index(name)]):
                    raise TypeError(f"non-default field {name!r} follows a default one")
                params.append(name)
                body.append(f" self.{name} = {name}")
            elif isinstance(default, _Factory):
                namespace[f"_make_{name}"] = default.make
                params.append(f"{name}=_MISSING")
                body.append(f" self.{name} = _make_{name}() if {name} is _MISSING else {name}")
                if name in vars(cls):
                    delattr(cls, name)
            else:
                namespace[f"_default_{name}"] = default
                params.append(f"{name}=_default_{name}")
                body.append(f" self.{name} = {name}")
        exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or [" pass"]),
             namespace)
        init = namespace["__init__"]
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        fields = tuple(names)

        def __repr__(self: Any) -> str:
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields)
            return f"{type(self).__qualname__}({shown})"

        def __eq__(self: Any, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            # Tuples, as dataclasses compare: a field holding the same object on both sides
            # is equal even if it is not equal to itself (a NaN).
            return (tuple(getattr(self, name) for name in fields)
                    == tuple(getattr(other, name) for name in fields))

        cls.__init__ = init
        cls.__repr__ = __repr__
        cls.__eq__ = __eq__
        cls.__hash__ = None
        cls.__record_fields__ = fields
        cls.__record_defaults__ = found  # factories kept, for subclasses
        return cls


def fields_of(cls: type) -> tuple[str, ...]:
    """The field names of a record class, in order."""
    names: tuple[str, ...] = vars(cls)["__record_fields__"]
    return names


__all__ = ["field", "fields_of", "record"]
