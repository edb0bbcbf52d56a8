"""JSON schema -> regular expression, in two syntaxes: JSON, and Gemma 4's tool-call argument syntax.

A schema becomes a regex whose every match is a value that validates against the schema, so that a token
automaton built from it (automaton.py) can only write valid values. A keyword whose meaning a regex cannot
carry (uniqueItems, minProperties, recursive $ref, ...) is refused with `SchemaError` naming it, never
silently ignored: the promise is that every output validates.

Supported: type (and lists of types), properties / required (keys written in `properties` order for JSON,
sorted for Gemma as its chat template writes them; optional keys may be left out), additionalProperties as
false or, for an object without properties, a schema for every value; items with minItems / maxItems; enum,
const; anyOf / oneOf (as alternatives); allOf with one member; local $ref (#/$defs, #/definitions);
strings with minLength / maxLength, pattern (its `.` and negated classes narrowed so that the string needs
no escapes: `narrow`),
format date / time / date-time / uuid; integers with minimum / maximum (exclusive ones too); numbers with
integer bounds >= 0 (numbers are written with at most 16 digits before and after the point); booleans, null, and `{}` / `true` (any value, nested at most two levels).

The Gemma syntax (`letterpress.chat_output` parses it): `{key:value,...}` with bare keys, strings in `<|"|>`,
bare numbers, true/false/null, lists `[...]`; no whitespace, as the chat template writes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RequestError


class SchemaError(RequestError):
    """A schema (or regex, or choice list) that cannot be compiled; the message names the problem."""


ANY_DEPTH = 2  # how deeply `{}` (any value) and json_object may nest objects and lists
# the largest minItems / maxItems / minLength / maxLength: a DFA holds one copy of a bounded repeat's body
# per count, and nested bounded repeats multiply (unbounded ones, as in "any value", cost nothing extra)
MAX_REPEAT = 128
# the longest regex a schema may become (a chain of $refs each used twice doubles it per link); the compiled
# automaton's size is checked separately (size.py)
MAX_REGEX_CHARS = 200_000
# Numbers have at most 16 integer digits, 16 fraction digits and a 3-digit exponent: beyond that a float64
# (what JSON readers parse into) holds no more, and a short bound keeps a weak model from writing digits forever
_INT = r"-?(?:0|[1-9][0-9]{0,15})"
_FRACTION, _EXPONENT = r"(?:\.[0-9]{1,16})?", r"(?:[eE][+-]?[0-9]{1,3})?"
_FORMATS = {
    "date": r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])",
    "time": r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
_FORMATS["date-time"] = _FORMATS["date"] + "T" + _FORMATS["time"]
# keywords that only annotate (no effect on which values validate)
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs",
                "definitions", "deprecated", "readOnly", "writeOnly", "nullable", "strict"}
_HANDLED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
            "const", "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength", "pattern", "format", "minimum",
            "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class Syntax:
    """How values are spelled."""

    name: str
    string_char: str  # one character of a string's body
    quote: str  # regex of the string delimiter (both ends)
    colon: str
    comma: str
    sort_keys: bool
    forbidden_class: str  # class text of what a string pattern's `.` / negated classes may not match
    forbidden_literals: str  # characters a pattern may not write literally

    def string(self, body: str) -> str:
        return f"{self.quote}{body}{self.quote}"

    def key(self, name: str) -> str:
        if self.name == "gemma" and _BARE_KEY.fullmatch(name):
            return re.escape(name)
        return re.escape(self.literal(name))

    def literal(self, value: Any) -> str:
        """The text of a constant value in this syntax."""
        if self.name == "json":
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if isinstance(value, str):
            return f'<|"|>{value}<|"|>'
        if isinstance(value, bool) or value is None:
            return json.dumps(value)
        if isinstance(value, (int, float)):
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ",".join(self.literal(v) for v in value) + "]"
        if isinstance(value, dict):
            items = sorted(value.items(), key=lambda kv: template_key(kv[0])) if self.sort_keys else value.items()
            return "{" + ",".join(f"{k if _BARE_KEY.fullmatch(k) else self.literal(k)}:{self.literal(v)}"
                                  for k, v in items) + "}"
        raise SchemaError(f"cannot write the constant {value!r}")


JSON = Syntax("json", r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])', '"', "[ ]?:[ ]?", "[ ]?,[ ]?", sort_keys=False,
              forbidden_class=r'"\\\x00-\x1f', forbidden_literals='"\\')
# A Gemma string may hold anything but its own delimiter; "no '<' at all" is the simple regular subset
GEMMA = Syntax("gemma", r"[^<]", r'<\|"\|>', ":", ",", sort_keys=True, forbidden_class="<", forbidden_literals="<")


def schema_regex(schema: Any, syntax: Syntax = JSON) -> str:
    """The regex of the values that validate against `schema` (SchemaError for what it cannot express)."""
    if not isinstance(schema, (dict, bool)):
        raise SchemaError(f"a JSON schema must be an object (or true), got {type(schema).__name__}")
    _check_schema(schema)
    return _Builder(schema, syntax).value(schema, "#", ())


def json_object_regex() -> str:
    """response_format {"type": "json_object"}: any JSON object (nested at most ANY_DEPTH levels)."""
    return _Builder({}, JSON).any_object(ANY_DEPTH)


def choice_regex(choices: Any) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise SchemaError("choice must be a non-empty list of strings")
    return "(?:" + "|".join(re.escape(c) for c in choices) + ")"


def template_key(name: str) -> str:
    """The order the chat template writes an object's keys in: Jinja's `dictsort`, which ignores case (ties keep
    their order; Python's sort is stable too)."""
    return name.lower()


def tool_call_regex(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """Gemma's `<|tool_call>call:NAME{args}<tool_call|>` for one of `tools` (or the one called `name`),
    with arguments valid against the tool's `parameters`; `parallel`: one or more calls in a row."""
    calls = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise SchemaError("every tool needs a function with a name")
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters")
        if parameters is None:  # OpenAI: a function without parameters takes none (not "any object")
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        try:
            arguments = schema_regex(parameters, GEMMA)
        except SchemaError as e:
            raise SchemaError(f"tool {function['name']!r}: {e}") from None
        calls.append(r"<\|tool_call>call:" + re.escape(function["name"]) + f"(?:{arguments})" + r"<tool_call\|>")
    if not calls:
        raise SchemaError(f"tool_choice names the function {name!r}, which is not among the tools"
                          if name is not None else "tool_choice 'required' needs at least one tool")
    one = "(?:" + "|".join(calls) + ")"
    return one + ("+" if parallel else "")


# ------------------------------------------------------------------------------------------- the builder
def _check_schema(schema: Any) -> None:
    """The schema itself must be valid JSON schema (when `jsonschema` is installed, its own check)."""
    try:
        import jsonschema
    except ImportError:  # the builder still refuses what it cannot read
        return
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise SchemaError(f"invalid JSON schema{' at ' + where if where else ''}: {e.message}") from None


class _Builder:
    def __init__(self, root: Any, syntax: Syntax):
        self.root, self.syntax = root, syntax

    def value(self, schema: Any, where: str, refs: tuple[str, ...]) -> str:
        regex = self._value(schema, where, refs)
        if len(regex) > MAX_REGEX_CHARS:
            raise SchemaError(f"{where}: the schema is too large: its regex passes {MAX_REGEX_CHARS:,} characters "
                              "(shared $defs are written out at every use); simplify it")
        return regex

    def _value(self, schema: Any, where: str, refs: tuple[str, ...]) -> str:
        if schema is True or schema == {}:
            return self.any_value(ANY_DEPTH)
        if schema is False:
            raise SchemaError(f"{where}: the schema `false` accepts no value")
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object")
        unknown = sorted(set(schema) - _HANDLED - _ANNOTATIONS)
        if unknown:
            raise SchemaError(f"{where}: the keyword {unknown[0]!r} is not supported for structured output "
                              "(it cannot be guaranteed by a finite automaton here)")
        if "$ref" in schema:
            return self.ref(schema, where, refs)
        if "allOf" in schema:
            members = schema["allOf"]
            if not isinstance(members, list) or len(members) != 1:
                raise SchemaError(f"{where}: allOf is supported with exactly one member")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.value({**rest, **members[0]}, where + "/allOf/0", refs)
        if "const" in schema:
            return re.escape(self.syntax.literal(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            return _alternatives([re.escape(self.syntax.literal(v)) for v in values])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                members = schema[key]
                rest = {k: v for k, v in schema.items() if k != key}
                return _alternatives([self.value({**rest, **m} if isinstance(m, dict) else m, f"{where}/{key}/{i}", refs)
                                      for i, m in enumerate(members)])
        types = schema.get("type")
        if types is None:
            types = _implied_type(schema)
        if isinstance(types, list):
            return _alternatives([self.value({**schema, "type": t}, where, refs) for t in types])
        build: dict[str, Callable[[dict, str, tuple], str]] = {
            "object": self.object, "array": self.array, "string": self.string, "integer": self.integer,
            "number": self.number, "boolean": lambda *_: "(?:true|false)", "null": lambda *_: "null"}
        if types not in build:
            raise SchemaError(f"{where}: unknown type {types!r}")
        return build[types](schema, where, refs)

    def ref(self, schema: dict, where: str, refs: tuple[str, ...]) -> str:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{where}: only local references (#/$defs/...) are supported, got {ref!r}")
        if ref in refs:
            raise SchemaError(f"{where}: the reference {ref!r} is recursive, which a finite automaton cannot follow")
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{where}: the reference {ref!r} points nowhere")
            target = target[part]
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        merged = {**target, **rest} if isinstance(target, dict) else target
        return self.value(merged, ref, refs + (ref,))

    # ---- containers
    def object(self, schema: dict, where: str, refs: tuple) -> str:
        s = self.syntax
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        missing = [r for r in required if r not in properties]
        extra = schema.get("additionalProperties", True)
        if missing and extra is False:
            raise SchemaError(f"{where}: required property {missing[0]!r} is not in properties")
        if not properties and extra is not False:  # a map: any keys, values valid against additionalProperties
            value = self.any_value(ANY_DEPTH - 1) if extra is True or extra == {} else \
                self.value(extra, where + "/additionalProperties", refs)
            if missing:
                raise SchemaError(f"{where}: required keys without properties are not supported")
            pair = f"{s.string(s.string_char + '*') if s.name == 'json' else _GEMMA_KEY}{s.colon}(?:{value})"
            return rf"\{{(?:{pair}(?:{s.comma}{pair})*)?\}}"
        if missing:  # a required key the schema says nothing about: any value
            properties = {**properties, **{r: {} for r in missing}}
        names = sorted(properties, key=template_key) if s.sort_keys else list(properties)
        pairs = [f"{s.key(n)}{s.colon}(?:{self.value(properties[n], f'{where}/properties/{n}', refs)})" for n in names]
        needed = [n in required for n in names]
        return r"\{" + _optional_sequence(pairs, needed, s.comma) + r"\}"

    def array(self, schema: dict, where: str, refs: tuple) -> str:
        s = self.syntax
        items = schema.get("items", {})
        if isinstance(items, list):
            raise SchemaError(f"{where}: tuple-style items (a list) are not supported; use one schema")
        item = f"(?:{self.value(items, where + '/items', refs)})"
        low, high = _bounds(schema, "minItems", "maxItems", where)
        if high is not None and low > high:
            raise SchemaError(f"{where}: minItems {low} > maxItems {high}")
        if high == 0:
            return r"\[\]"
        more = _repeat(f"{s.comma}{item}", max(low - 1, 0), None if high is None else high - 1)
        body = f"{item}{more}"
        return rf"\[(?:{body})\]" if low > 0 else rf"\[(?:{body})?\]"

    # ---- scalars
    def string(self, schema: dict, where: str, refs: tuple) -> str:
        s = self.syntax
        if "pattern" in schema:
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise SchemaError(f"{where}: pattern must be a string")
            if "minLength" in schema or "maxLength" in schema:
                raise SchemaError(f"{where}: pattern together with minLength/maxLength is not supported")
            if any(c in _unescaped_literals(pattern) for c in s.forbidden_literals):
                raise SchemaError(f"{where}: the pattern {pattern!r} writes a character a {s.name} string cannot "
                                  "hold unescaped")
            return s.string(f"(?:{_anchored(narrow(pattern, s.forbidden_class), s.string_char)})")
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in _FORMATS:
                raise SchemaError(f"{where}: string format {fmt!r} is not supported (only {', '.join(_FORMATS)})")
            return s.string(_FORMATS[fmt])
        low, high = _bounds(schema, "minLength", "maxLength", where)
        return s.string(_repeat(s.string_char, low, high))

    def integer(self, schema: dict, where: str, refs: tuple) -> str:
        low, high = _numeric_bounds(schema, where, integer=True)
        if low is None and high is None:
            return _INT
        return _int_range(low, high)

    def number(self, schema: dict, where: str, refs: tuple) -> str:
        low, high = _numeric_bounds(schema, where, integer=False)
        if low is None and high is None:
            return _INT + _FRACTION + _EXPONENT
        if low is None or low < 0 or low != int(low) or (high is not None and high != int(high)):
            raise SchemaError(f"{where}: bounds on a number are supported only as integers >= 0 "
                              "(use type integer, or drop the bound)")
        whole = _int_range(int(low), None if high is None else int(high) - 1)
        below = f"{whole}{_FRACTION}"
        if high is None:
            return below
        return _alternatives([below, f"{int(high)}(?:\\.0+)?"])

    # ---- any value
    def any_value(self, depth: int) -> str:
        s = self.syntax
        scalars = [s.string(s.string_char + "*"), _INT + _FRACTION + _EXPONENT, "true", "false", "null"]
        if depth <= 0:
            return _alternatives(scalars)
        inner = self.any_value(depth - 1)
        array = rf"\[(?:(?:{inner})(?:{s.comma}(?:{inner}))*)?\]"
        return _alternatives(scalars + [self.any_object(depth), array])

    def any_object(self, depth: int) -> str:
        s = self.syntax
        inner = self.any_value(depth - 1)
        key = s.string(s.string_char + "*") if s.name == "json" else _GEMMA_KEY
        pair = f"{key}{s.colon}(?:{inner})"
        return rf"\{{(?:{pair}(?:{s.comma}{pair})*)?\}}"


_GEMMA_KEY = r"[A-Za-z_][A-Za-z0-9_]*"


def _implied_type(schema: dict) -> str | list[str]:
    if "properties" in schema or "additionalProperties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "minItems" in schema or "maxItems" in schema:
        return "array"
    if {"pattern", "minLength", "maxLength", "format"} & set(schema):
        return "string"
    if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(schema):
        return "number"
    return ["object", "array", "string", "number", "boolean", "null"]


def _alternatives(parts: list[str]) -> str:
    return "(?:" + "|".join(f"(?:{p})" for p in parts) + ")"


def _repeat(unit: str, low: int, high: int | None) -> str:
    if high is None:
        return f"(?:{unit})*" if low == 0 else f"(?:{unit}){{{low},}}"
    return f"(?:{unit}){{{low},{high}}}"


def _bounds(schema: dict, low_key: str, high_key: str, where: str) -> tuple[int, int | None]:
    low, high = schema.get(low_key, 0), schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise SchemaError(f"{where}: {key} must be a non-negative integer")
    if high is not None and low > high:
        raise SchemaError(f"{where}: {low_key} {low} > {high_key} {high}")
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and value > MAX_REPEAT:
            raise SchemaError(f"{where}: {key} {value} is too large for structured output (at most {MAX_REPEAT}: the "
                              "automaton holds one copy of the item per count)")
    return low, high


def _optional_sequence(pairs: list[str], needed: list[bool], comma: str) -> str:
    """The pairs in order, the optional ones possibly left out, separated by `comma`. Quadratic in the number
    of pairs: once one pair is written, every later one is `(,pair)?` (or `,pair` when required)."""
    after: list[str] = [""] * (len(pairs) + 1)  # after[i]: pairs i.. once something was written
    for i in range(len(pairs) - 1, -1, -1):
        item = f"{comma}{pairs[i]}"
        after[i] = (item if needed[i] else f"(?:{item})?") + after[i + 1]
    first = ""  # first[i]: pairs i.. when nothing was written yet
    for i in range(len(pairs) - 1, -1, -1):
        start = pairs[i] + after[i + 1]
        first = start if needed[i] else (f"(?:{start}|{first})" if first else f"(?:{start})?")
    return first


def narrow(regex: str, excluded: str) -> str:
    """`regex` with the characters of the class text `excluded` taken out of what could match them loosely:
    `.`, negated classes, and the negated shorthands \\D \\W \\S outside classes. Only ever narrows the
    matched language. (Literals and positive classes are left alone.)"""
    out, i, depth = [], 0, 0  # depth: inside [...] (nested classes count)
    negated: list[bool] = []
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            pair = regex[i:i + 2]
            out.append(f"[^\\{pair[1].lower()}{excluded}]" if depth == 0 and pair[1] in "DWS" else pair)
            i += 2
            continue
        if c == "[":
            neg = regex.startswith("^", i + 1)
            negated.append(neg)
            depth += 1
            out.append("[^" if neg else "[")
            i += 2 if neg else 1
            if regex.startswith("]", i):  # a leading ] is a literal
                out.append("]")
                i += 1
            continue
        if c == "]" and depth:
            depth -= 1
            out.append(excluded + "]" if negated.pop() else "]")
        elif c == "." and depth == 0:
            out.append(f"[^\\n{excluded}]")
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _unescaped_literals(pattern: str) -> str:
    """The characters a pattern writes as bare literals outside classes (a rough scan: enough to find a
    bare `"` or backslash escape of a quote)."""
    out, i, depth = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            if pattern[i + 1] in "\"\\" and depth == 0:
                out.append(pattern[i + 1])
            i += 2
            continue
        depth += c == "["
        depth -= c == "]" and depth > 0
        if depth == 0 and c not in "[]":
            out.append(c)
        i += 1
    return "".join(out)


def _anchored(pattern: str, char: str) -> str:
    """JSON-schema patterns search; a generated string is matched whole, so a leading ^ / trailing $ go and
    an unanchored end allows any text there."""
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    core = pattern[1 if start else 0: len(pattern) - (1 if end else 0)]
    filler = f"(?:{char})*"
    return ("" if start else filler) + f"(?:{core})" + ("" if end else filler)


def _numeric_bounds(schema: dict, where: str, integer: bool) -> tuple[float | None, float | None]:
    low, high = schema.get("minimum"), schema.get("maximum")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise SchemaError(f"{where}: {key} must be a finite number")
    if "exclusiveMinimum" in schema:
        e = schema["exclusiveMinimum"]
        e = math.floor(e) + 1 if integer else e
        low = e if low is None else max(low, e)
        if not integer:
            raise SchemaError(f"{where}: exclusiveMinimum on a number is not supported (use type integer)")
    if "exclusiveMaximum" in schema:
        e = schema["exclusiveMaximum"]
        if not integer:
            raise SchemaError(f"{where}: exclusiveMaximum on a number is not supported (use type integer)")
        e = math.ceil(e) - 1
        high = e if high is None else min(high, e)
    if integer:
        low = None if low is None else math.ceil(low)
        high = None if high is None else math.floor(high)
    if low is not None and high is not None and low > high:
        raise SchemaError(f"{where}: no number lies between minimum {low} and maximum {high}")
    return low, high


# ---- integer ranges as regexes
def _int_range(low: int | None, high: int | None) -> str:
    """Decimal integers (no leading zeros, "-" only for negatives) in [low, high]; None: unbounded."""
    parts = []
    if low is None or low < 0:  # the negative part: -n with n in [max(1, -high), -low]
        neg_low = 1 if high is None or high >= 0 else -high
        neg_high = None if low is None else -low
        if neg_high is None or neg_low <= neg_high:
            parts.append("-" + _nat_range(neg_low, neg_high))
    if high is None or high >= 0:
        parts.append(_nat_range(max(low or 0, 0), high))
    return _alternatives(parts)


def _nat_range(low: int, high: int | None) -> str:
    """Natural numbers in [low, high] (high None: unbounded)."""
    if high is None:
        digits = len(str(low))
        top = 10 ** digits - 1
        if digits >= 16:
            return _nat_range(low, top)
        return _alternatives([_nat_range(low, top), f"[1-9][0-9]{{{digits},15}}"])
    parts = []
    for width in range(len(str(low)), len(str(high)) + 1):
        lo, hi = max(low, 10 ** (width - 1) if width > 1 else 0), min(high, 10 ** width - 1)
        if lo <= hi:
            parts.extend(_same_width(str(lo), str(hi)))
    return _alternatives(parts)


def _same_width(lo: str, hi: str) -> list[str]:
    """Regexes for the numbers between lo and hi, both with the same number of digits."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [lo[0] + f"(?:{'|'.join(_same_width(lo[1:], hi[1:]))})"]
    rest = len(lo) - 1
    out = []
    low_full, high_full = lo[1:] == "0" * rest, hi[1:] == "9" * rest
    first_mid = int(lo[0]) + (0 if low_full else 1)
    last_mid = int(hi[0]) - (0 if high_full else 1)
    if not low_full:
        out.append(lo[0] + f"(?:{'|'.join(_same_width(lo[1:], '9' * rest))})")
    if first_mid <= last_mid:
        out.append(f"[{first_mid}-{last_mid}][0-9]{{{rest}}}")
    if not high_full:
        out.append(hi[0] + f"(?:{'|'.join(_same_width('0' * rest, hi[1:]))})")
    return out
