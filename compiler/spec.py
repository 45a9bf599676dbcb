"""Pipeline spec strings: `pass-a{k=v,k2="x,y"},pass-b`.

Values are coerced to the option's declared type with pydantic (lax mode: "0.7" -> 0.7, "true" ->
True); tuples are written `a;b;c`. `format_value` is the inverse, so `parse(spec(p)) == p`.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any

from compiler.errors import SpecError

DEFAULT_SPARSITY = 0.5  # the one default target sparsity: --sparsity, the shorthand pipeline, sparsity-allocation

_SIMPLE = re.compile(r"^[A-Za-z0-9_.:+\-/*]*$")


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, str]


def parse_spec(text: str) -> list[PassSpec]:
    """Split a spec string into pass names and raw option strings."""
    out: list[PassSpec] = []
    i, n = 0, len(text)

    def skip_ws() -> None:
        nonlocal i
        while i < n and text[i].isspace():
            i += 1

    while True:
        skip_ws()
        start = i
        while i < n and (text[i].isalnum() or text[i] in "-_"):
            i += 1
        name = text[start:i]
        if not name:
            raise SpecError(f"pass spec '{text}': expected a pass name at position {start}")
        skip_ws()
        opts: dict[str, str] = {}
        if i < n and text[i] == "{":
            i += 1
            while True:
                skip_ws()
                if i < n and text[i] == "}":
                    i += 1
                    break
                k0 = i
                while i < n and (text[i].isalnum() or text[i] in "_-"):
                    i += 1
                key = text[k0:i].replace("-", "_")
                skip_ws()
                if not key or i >= n or text[i] != "=":
                    raise SpecError(f"pass spec '{text}': expected key=value in options of '{name}'")
                i += 1
                skip_ws()
                if i < n and text[i] in "\"'":
                    quote = text[i]
                    end = text.find(quote, i + 1)
                    if end < 0:
                        raise SpecError(f"pass spec '{text}': unterminated quote in options of '{name}'")
                    value = text[i + 1 : end]
                    i = end + 1
                else:
                    v0 = i
                    while i < n and text[i] not in ",}":
                        i += 1
                    value = text[v0:i].strip()
                if key in opts:
                    raise SpecError(f"pass spec: option '{key}' given twice for '{name}'")
                opts[key] = value
                skip_ws()
                if i < n and text[i] == ",":
                    i += 1
                    continue
                if i < n and text[i] == "}":
                    i += 1
                    break
                raise SpecError(f"pass spec '{text}': expected ',' or '}}' in options of '{name}'")
        out.append(PassSpec(name, opts))
        skip_ws()
        if i >= n:
            return out
        if text[i] != ",":
            raise SpecError(f"pass spec '{text}': unexpected '{text[i]}' at position {i}")
        i += 1


def load_yaml_file(path: Any, what: str) -> Any:
    """Parse a YAML file; a missing file or invalid YAML is a one-line SpecError naming `what`."""
    from pathlib import Path

    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{what} '{path}' does not exist")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{what} '{path}' is not valid YAML: {first}") from None


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Validate/convert a raw value (string from a spec, or YAML scalar) to the annotated type."""
    import pydantic

    if isinstance(value, str) and _is_tuple(annotation):
        value = tuple(v for v in value.split(";") if v != "") if value else ()
    if isinstance(value, str) and value.lower() in ("none", "null") and _allows_none(annotation):
        value = None
    try:
        return pydantic.TypeAdapter(annotation).validate_python(value)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        raise SpecError(f"{where}: invalid value {value!r}: {err['msg']}") from None


def _is_tuple(annotation: Any) -> bool:
    if typing.get_origin(annotation) is tuple:
        return True
    return any(typing.get_origin(a) is tuple for a in typing.get_args(annotation))


def _allows_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return format_value(";".join(str(v) for v in value))
    text = repr(value) if isinstance(value, float) else str(value)
    if _SIMPLE.match(text):
        return text
    if '"' not in text:
        return f'"{text}"'
    return f"'{text}'"
