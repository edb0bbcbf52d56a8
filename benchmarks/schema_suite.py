"""The JSON-schema suite that structured output is checked on (tests/test_structured.py) and measured on
(benchmarks/structured.py): one schema per feature the schema -> regex translation handles (nested objects,
array bounds, enums, number bounds, patterns and formats, optional properties, $ref / anyOf). Bounds are small
enough that an answer spans a few 16-token canvases of the tests' random model. It lives here, not in tests/,
so that the benchmark and the tests share one suite and the benchmarks import nothing from tests/.
"""

SUITE = {
    "nested": {"type": "object", "required": ["user", "ok"], "properties": {
        "user": {"type": "object", "required": ["name", "id"], "properties": {
            "name": {"type": "string", "maxLength": 6}, "id": {"type": "integer"}}},
        "ok": {"type": "boolean"}}},
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 12},
                     "minItems": 2, "maxItems": 4},
    "enums": {"type": "object", "required": ["color", "size"], "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2.5, None, "XL"]}}},
    "numbers": {"type": "object", "required": ["price", "count", "ratio"], "properties": {
        "price": {"type": "number", "minimum": 0, "maximum": 100}, "count": {"type": "integer", "exclusiveMinimum": 0},
        "ratio": {"type": "number"}}},
    "patterns": {"type": "object", "required": ["code", "day", "free"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "day": {"type": "string", "format": "date"},
        "free": {"type": "string", "pattern": "^x.{0,5}[^a-z]$"}}},  # `.` / [^...] never write a quote or \\
    "optional": {"type": "object", "required": ["b"], "properties": {
        "a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 4}, "c": {"type": "null"},
        "d": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}}},
    "refs_anyof": {"$defs": {"pt": {"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}}},
        "type": "object", "required": ["pts"], "properties": {
            "pts": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "maxItems": 2},
            "label": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]}}},
}
