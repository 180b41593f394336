"""Constraints shared by the engine and server tests, each with its oracle.

Schemas are bounded (maxLength, maxItems, integer ranges, enums) so that a random model,
which the mask alone keeps on track, finishes well within ``MAX_TOKENS``.
"""
import re

MAX_TOKENS = 160

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {"type": "object",
                     "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                    "name": {"type": "string", "minLength": 1, "maxLength": 6}},
                     "required": ["id", "name"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"], "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                       "minItems": 1, "maxItems": 4},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
        "required": ["colors", "size"], "additionalProperties": False,
    },
    "bounded_numbers_optional": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "note": {"type": ["string", "null"], "maxLength": 4},
        },
        "required": ["count"], "additionalProperties": False,
    },
    "string_pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]$"},
        },
        "required": ["code", "date"], "additionalProperties": False,
    },
    "top_level_array": {
        "type": "array",
        "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                          "maximum": 9}},
                  "required": ["x"], "additionalProperties": False},
        "minItems": 1, "maxItems": 3,
    },
}

REGEXES = [
    r"[a-z]{3,6}@[a-z]{2,5}\.(com|org)",
    r"\d{3}-\d{4}",
    r"(true|false|maybe)",
    r"#[0-9a-f]{6}",
]

CHOICES = [["yes", "no"], ["Paris", "London", "New York", "東京"],
           ["a-b #x & ~y", "C++ (v2.0)?", '東京 "q"\\']]  # regex / EBNF metacharacters

# Arithmetic expressions, EBNF (GBNF) and Lark forms of the same language; parentheses nest
# one level so that random models finish.
ARITH_EBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= num | "(" inner ")"
inner ::= num (("+" | "-" | "*" | "/") num){0,3}
num ::= [1-9] [0-9]{0,2}
"""
ARITH_LARK = r"""
?start: expr
?expr: term (("+" | "-") term)~0..3
?term: factor (("*" | "/") factor)~0..2
?factor: NUMBER | "(" inner ")"
?inner: NUMBER (("+" | "-" | "*" | "/") NUMBER)~0..3
NUMBER: /[1-9][0-9]{0,2}/
"""


def parse_arith(text: str) -> bool:
    """Recursive-descent check that ``text`` is an arithmetic expression (oracle)."""
    tokens = re.findall(r"\d+|[-+*/()]|\S", text)
    pos = 0

    def factor():
        nonlocal pos
        if pos < len(tokens) and tokens[pos].isdigit():
            pos += 1
            return True
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            if not expr() or pos >= len(tokens) or tokens[pos] != ")":
                return False
            pos += 1
            return True
        return False

    def chain(sub, ops):
        nonlocal pos
        if not sub():
            return False
        while pos < len(tokens) and tokens[pos] in ops:
            pos += 1
            if not sub():
                return False
        return True

    def term():
        return chain(factor, "*/")

    def expr():
        return chain(term, "+-")

    return "".join(tokens) == text and expr() and pos == len(tokens)
