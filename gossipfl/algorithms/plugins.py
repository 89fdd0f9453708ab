"""Naming rules from a config: the parameter tables of built-in filters and attacks, and the loader
for a user's own rule given as `package.module:function`.

Both are checked when a config is loaded, so that a typo or a function with the wrong signature
stops the run with one clear message (a ValueError naming what was given) before anything starts.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping


@dataclass(frozen=True)
class Parameter:
    default: Any
    meaning: str


def parameter_table(rule: Callable[..., Any], meanings: Mapping[str, str],
                    provided: Iterable[str] = ()) -> dict[str, Parameter]:
    """{name: Parameter} for the keyword parameters of `rule` (a class or a function), leaving out
    the arguments a runtime `provided`: the defaults come from the signature, so each default is
    written once, where the rule is."""
    skip = set(provided)
    params = [p for p in inspect.signature(rule).parameters.values() if p.name not in skip]
    if sorted(p.name for p in params) != sorted(meanings):
        raise TypeError(f"{rule.__qualname__}: documented parameters {sorted(meanings)} "
                        f"differ from its signature's {sorted(p.name for p in params)}")
    return {p.name: Parameter(p.default, meanings[p.name]) for p in params}


def construct(kind: str, name: str, rule: Callable[..., Any], table: Mapping[str, Parameter],
              provided: Mapping[str, Any], given: Mapping[str, Any]) -> Any:
    """`rule(...)` with the configured parameters `given` (refused if the rule has no such
    parameter) and whichever of the runtime's `provided` arguments its signature names."""
    unknown = sorted(set(given) - set(table))
    if unknown:
        takes = ", ".join(table) or "no parameters"
        raise ValueError(f"{kind} {name!r} has no parameter {unknown[0]!r}; it takes: {takes}")
    wanted = inspect.signature(rule).parameters
    return rule(**{k: v for k, v in provided.items() if k in wanted}, **given)


def is_plugin_name(text: str) -> bool:
    """Whether a rule name means a user's `package.module:function` rather than a built-in."""
    return ":" in text


def load_callable(text: str, kind: str) -> Callable[[Any], Any]:
    """The callable named `package.module:function` (the function may be a dotted attribute path),
    refused with a ValueError if the name is malformed, the module or attribute is missing, the
    object is not callable, or it cannot be called with exactly one positional argument."""
    where = f"{kind} {text!r}"
    module_name, _, attribute = text.partition(":")
    if not (_dotted_identifiers(module_name) and _dotted_identifiers(attribute)):
        raise ValueError(f"{where}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"{where}: no module named {e.name!r} (is it on the Python path?)") from None
        raise ValueError(f"{where}: importing {module_name!r} failed: {e}") from None
    except Exception as e:  # the user's module body raised: report it, never a traceback
        raise ValueError(f"{where}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where}: {attribute!r} is a {type(obj).__name__}, not a function")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: its signature cannot be read, so it cannot be checked") from None
    try:
        signature.bind(object())
    except TypeError:
        raise ValueError(f"{where}: must take exactly one positional argument (the batch), "
                         f"but its signature is {signature}") from None
    return obj


def _dotted_identifiers(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))
