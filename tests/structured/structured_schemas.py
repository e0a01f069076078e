"""JSON schemas for the generation tests: (what to describe, schema). Nested objects, arrays, enums, bounded
numbers, required and optional fields, $refs, anyOf, patterns, formats, consts.

Strings and arrays carry bounds so every output completes within the tests' max_tokens: the assertion is that
every output is complete and valid, which an unbounded string a small model repeats forever could not promise.
"""

from __future__ import annotations

from typing import Any


def s(n: int = 16, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": n, **kw}


def i(lo: int = 0, hi: int = 1000) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = False) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": extra}


def arr(items: dict[str, Any], lo: int = 0, hi: int = 3) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


NUM = {"type": "number", "minimum": 0, "maximum": 100}

CASES: list[tuple[str, dict[str, Any]]] = [
    ("a person", obj({"name": s(), "age": i(0, 120)})),
    ("a city", obj({"city": s(), "country": s(), "population": i(0, 10**8)})),
    ("a book", obj({"title": s(20), "author": s(), "year": i(1400, 2030)})),
    ("a movie rating", obj({"movie": s(), "stars": i(1, 5)})),
    ("a product", obj({"name": s(), "price": NUM, "in_stock": {"type": "boolean"}})),
    ("a color", obj({"name": s(12), "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    ("a traffic light", obj({"state": {"enum": ["red", "yellow", "green"]}})),
    ("a weekday", obj({"day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}, "holiday": {
        "type": "boolean"}})),
    ("a yes/no answer", obj({"answer": {"enum": ["yes", "no"]}, "confidence": NUM})),
    ("a temperature", obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60}})),
    ("a point", obj({"x": i(-100, 100), "y": i(-100, 100)})),
    ("a 3d point", obj({"x": NUM, "y": NUM, "z": NUM})),
    ("a rectangle", obj({"top_left": obj({"x": i(), "y": i()}), "bottom_right": obj({"x": i(), "y": i()})})),
    ("a user with an address", obj({"name": s(), "address": obj({"street": s(), "city": s(), "zip": {
        "type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("a shopping list", obj({"items": arr(s(16), 1, 4)})),
    ("lucky numbers", obj({"numbers": arr(i(1, 99), 1, 5)})),
    ("a team", obj({"team": s(), "members": arr(obj({"name": s(16), "role": {"enum": ["dev", "pm", "qa"]}}),
                                                 1, 3)})),
    ("a recipe", obj({"dish": s(12), "ingredients": arr(obj({"item": s(10), "grams": i(1, 2000)}), 1, 2),
                      "minutes": i(1, 300)})),
    ("a todo item", obj({"task": s(), "done": {"type": "boolean"}, "priority": {"enum": [1, 2, 3]}})),
    ("a bank account", obj({"owner": s(), "balance": {"type": "number", "minimum": -1000, "maximum": 10**6},
                            "currency": {"enum": ["USD", "EUR", "GBP"]}})),
    ("a person, age optional", obj({"name": s(), "age": i(0, 120)}, required=["name"])),
    ("a song, all optional", obj({"title": s(), "artist": s(), "seconds": i(1, 900)}, required=[])),
    ("an empty-ish settings object", obj({"verbose": {"type": "boolean"}}, required=[])),
    ("a pet", obj({"kind": {"enum": ["dog", "cat", "bird", "fish"]}, "name": s(16), "age": i(0, 40)})),
    ("an email", obj({"to": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}, "subject": s()})),
    ("a date", obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}})),
    ("a phone number", obj({"phone": {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3} [0-9]{4}$"}})),
    ("a version", obj({"major": i(0, 20), "minor": i(0, 99), "patch": i(0, 99)})),
    ("a matrix", obj({"rows": arr(arr(i(0, 9), 2, 2), 2, 2)})),
    ("tags", obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "minItems": 1,
                           "maxItems": 4}})),
    ("a score list", arr(i(0, 100), 1, 4)),
    ("a single word", s(12)),
    ("a number", i(0, 50)),
    ("a flag", {"type": "boolean"}),
    ("a constant", obj({"kind": {"const": "event"}, "id": i(1, 999)})),
    ("a shape", obj({"shape": {"anyOf": [obj({"circle_r": i(1, 10)}), obj({"square_side": i(1, 10)})]}})),
    ("an id or name", obj({"key": {"anyOf": [i(0, 999), s(12)]}})),
    ("a nullable nickname", obj({"nickname": {"anyOf": [s(12), {"type": "null"}]}})),
    ("a tree node", {"$defs": {"leaf": obj({"value": i(0, 9)})},
                     **obj({"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}})}),
    ("a company", obj({"name": s(), "ceo": obj({"name": s(), "since": i(1950, 2030)}),
                       "offices": arr(obj({"city": s(16)}), 1, 2)})),
    ("a flight", obj({"from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                      "to": {"type": "string", "pattern": "^[A-Z]{3}$"}, "seats": i(1, 9)})),
    ("a grade", obj({"student": s(), "grade": {"enum": ["A", "B", "C", "D", "F"]}, "score": NUM})),
    ("a sensor reading", obj({"sensor": s(12), "values": arr({"type": "number", "minimum": 0, "maximum": 10},
                                                               1, 3)})),
    ("an exclusive range", obj({"ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}})),
    ("a multiple of five", obj({"n": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5}})),
    ("a word of fixed length", obj({"code": {"type": "string", "minLength": 4, "maxLength": 4,
                                             "pattern": "^[A-Z]+$"}})),
    ("a list of pairs", obj({"pairs": arr({"type": "array", "prefixItems": [s(8), i(0, 9)], "items": False,
                                           "minItems": 2, "maxItems": 2}, 1, 2)})),
    ("a nested config", obj({"db": obj({"host": s(16), "port": i(1, 65535), "tls": {"type": "boolean"}}),
                             "cache": obj({"ttl": i(0, 3600)}, required=[])})),
    ("a chess move", obj({"piece": {"enum": ["K", "Q", "R", "B", "N", "P"]},
                          "to": {"type": "string", "pattern": "^[a-h][1-8]$"}})),
    ("an http response", obj({"status": {"enum": [200, 201, 400, 404, 500]}, "body": s(20)})),
    ("a dictionary of counts", {"type": "object", "additionalProperties": i(0, 9), "maxProperties": 3}),
    ("a planet", obj({"name": s(12), "moons": i(0, 100), "gas_giant": {"type": "boolean"},
                      "rings": {"anyOf": [{"type": "null"}, i(1, 9)]}})),
    ("an event", obj({"title": s(), "attendees": arr(s(12), 0, 3), "online": {"type": "boolean"}},
                     required=["title", "online"])),
    ("a coordinate list", arr(obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                   "lon": {"type": "number", "minimum": -180, "maximum": 180}}), 1, 2)),
]
