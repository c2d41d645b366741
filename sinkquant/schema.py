"""The base of every typed config: strict pydantic models and one-line messages for their errors.

Recipes (`recipe.py`) and the KV-cache config (`kv/config.py`) share it, so a typo or an impossible
value reads the same wherever it was given: a recipe file, a checkpoint or a Python call.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

#: pydantic's names for the branches of a union type; left out of a field's dotted path in messages
UNION_BRANCHES = ("literal['channel']", "int", "list[int]", "literal['auto','none']")


class StrictModel(BaseModel):
    """extra="forbid": an unknown key is an error, never ignored. allow_inf_nan=False: `.nan` or `.inf`
    in a float field is a typo, never a setting."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def error_path(err: dict) -> tuple:
    """The field path of one pydantic error, without union-branch names."""
    return tuple(p for p in err["loc"] if not (isinstance(p, str) and p in UNION_BRANCHES))


def first_error(exc: ValidationError, prefix: str = "") -> str:
    """`key: what is wrong (got value)` for the first error of `exc`, as one line."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in (*([prefix] if prefix else []), *error_path(err))) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown field {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg} (got {err.get('input')!r})"
