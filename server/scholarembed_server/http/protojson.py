"""JSON bodies that mirror a proto message, from the proto itself: protobuf's JSON mapping (json_format)
reads and writes them, and the OpenAPI schemas are made from the message descriptors. A field added
to protos/ reaches the HTTP door and its OpenAPI document without an edit here.

Requests take the proto3 JSON mapping as json_format parses it: the proto's field names or their
lowerCamelCase JSON names, enum values by name ("SEARCH_MODE_HYBRID") or number. Responses are written
with the proto's field names. A body json_format refuses becomes InvalidArgumentError naming the field
at fault ("conditions[0].range.gte") in the proto's names, found by walking the body with the
descriptor, so the words do not depend on json_format's own messages.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from ..errors import InvalidArgumentError
from .errors import MalformedJsonError

M = TypeVar("M", bound=Message)
UINT32_MAX = 2**32 - 1
INT32_RANGE = (-(2**31), 2**31 - 1)


def parse(body: bytes, message_type: type[M]) -> M:
    """The request body as a `message_type`; MalformedJsonError (no JSON), or InvalidArgumentError naming
    the field that is wrong."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise MalformedJsonError(error.pos, error.msg) from None
    message = message_type()
    try:
        return json_format.ParseDict(data, message)
    except json_format.ParseError as error:
        raise _locate(data, message.DESCRIPTOR, "") or InvalidArgumentError("body", str(error)) from None


def render(message: Message) -> bytes:
    """The message as JSON with the proto's field names; fields without presence are written even when
    they hold their default (0, "", []), so a reader sees every field the proto has."""
    return orjson.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )


# -- where a body is wrong -------------------------------------------------------------------------


def _message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _parses(descriptor: Descriptor, data: dict[str, Any]) -> bool:
    try:
        json_format.ParseDict(data, _message_class(descriptor)())
    except json_format.ParseError:
        return False
    return True


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _locate(data: Any, descriptor: Descriptor, path: str) -> InvalidArgumentError | None:
    """The first field of `data` (a JSON value for a `descriptor` message at `path`) that does not parse."""
    if not isinstance(data, dict):
        return InvalidArgumentError(path or "body", f"must be a JSON object ({descriptor.name}), got {_kind(data)}")
    fields = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            known = ", ".join(f.name for f in descriptor.fields)
            return InvalidArgumentError(_join(path, key), f"unknown field of {descriptor.name}; it has {known}")
        if not _parses(descriptor, {key: value}):
            return _locate_value(field, value, _join(path, field.name))
    for oneof in descriptor.oneofs:
        chosen = [f.name for f in oneof.fields if f.name in data or f.json_name in data]
        if len(chosen) > 1:
            return InvalidArgumentError(path or "body", f"sets {' and '.join(chosen)}; set one {oneof.name}")
    return None


def _locate_value(field: FieldDescriptor, value: Any, path: str) -> InvalidArgumentError:
    """What is wrong with the value of one field, which json_format refused."""
    if _is_map(field):
        if not isinstance(value, dict):
            return InvalidArgumentError(
                path, f"must be an object of {_type_name(_map_value(field))}, got {_kind(value)}"
            )
        for key, item in value.items():
            if not _parses(field.containing_type, {field.name: {key: item}}):
                return _locate_single(_map_value(field), item, f"{path}[{key!r}]")
        return InvalidArgumentError(path, "invalid map")
    if field.is_repeated:
        if not isinstance(value, list):
            return InvalidArgumentError(path, f"must be a list of {_type_name(field)}, got {_kind(value)}")
        for index, item in enumerate(value):
            if not _parses(field.containing_type, {field.name: [item]}):
                return _locate_single(field, item, f"{path}[{index}]")
        return InvalidArgumentError(path, "invalid list")
    return _locate_single(field, value, path)


def _locate_single(field: FieldDescriptor, value: Any, path: str) -> InvalidArgumentError:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _locate(value, field.message_type, path) or InvalidArgumentError(path, "invalid value")
    return InvalidArgumentError(path, f"{value!r} is not {_type_name(field)}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _map_value(field: FieldDescriptor) -> FieldDescriptor:
    return field.message_type.fields_by_name["value"]


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _type_name(field: FieldDescriptor) -> str:
    """A field's type in words, for messages."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        return f"one of {', '.join(v.name for v in field.enum_type.values)}"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return f"a {field.message_type.name} object"
    return {
        FieldDescriptor.TYPE_STRING: "a string",
        FieldDescriptor.TYPE_BOOL: "true or false",
        FieldDescriptor.TYPE_UINT32: f"an integer from 0 to {UINT32_MAX}",
        FieldDescriptor.TYPE_INT32: f"an integer from {INT32_RANGE[0]} to {INT32_RANGE[1]}",
        FieldDescriptor.TYPE_DOUBLE: "a number",
        FieldDescriptor.TYPE_FLOAT: "a number",
    }.get(field.type, f"a {field.type} value")


# -- OpenAPI ---------------------------------------------------------------------------------------


def component_name(descriptor: Descriptor | EnumDescriptor) -> str:
    """A schema's name in the OpenAPI document: the proto's full name, e.g. scholarembed.v1.SearchRequest."""
    return descriptor.full_name


def reference(descriptor: Descriptor | EnumDescriptor) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{component_name(descriptor)}"}


def json_schemas(*roots: Descriptor) -> dict[str, dict[str, Any]]:
    """JSON Schemas (OpenAPI 3.1) of the messages and enums reachable from `roots`, by component name,
    as the proto3 JSON mapping writes them (proto field names; enums by name)."""
    schemas: dict[str, dict[str, Any]] = {}
    pending: list[Descriptor | EnumDescriptor] = list(roots)
    while pending:
        descriptor = pending.pop()
        name = component_name(descriptor)
        if name in schemas:
            continue
        if isinstance(descriptor, EnumDescriptor):
            schemas[name] = {"type": "string", "enum": [value.name for value in descriptor.values]}
            continue
        properties = {}
        for field in descriptor.fields:
            properties[field.name] = _field_schema(field, pending)
        schemas[name] = {"type": "object", "properties": properties}
        oneofs = [o for o in descriptor.oneofs if not o.name.startswith("_")]  # "_gt": a proto3 optional field
        if oneofs:
            schemas[name]["description"] = " ".join(
                f"At most one of {', '.join(f.name for f in o.fields)} ({o.name})." for o in oneofs
            )
    return dict(sorted(schemas.items()))


def _field_schema(field: FieldDescriptor, pending: list[Descriptor | EnumDescriptor]) -> dict[str, Any]:
    if _is_map(field):
        return {"type": "object", "additionalProperties": _single_schema(_map_value(field), pending)}
    single = _single_schema(field, pending)
    if field.is_repeated:
        return {"type": "array", "items": single}
    return single


def _single_schema(field: FieldDescriptor, pending: list[Descriptor | EnumDescriptor]) -> dict[str, Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        pending.append(field.message_type)
        return reference(field.message_type)
    if field.type == FieldDescriptor.TYPE_ENUM:
        pending.append(field.enum_type)
        return reference(field.enum_type)
    scalar: dict[int, dict[str, Any]] = {
        FieldDescriptor.TYPE_STRING: {"type": "string"},
        FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
        FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": UINT32_MAX},
        FieldDescriptor.TYPE_INT32: {"type": "integer", "minimum": INT32_RANGE[0], "maximum": INT32_RANGE[1]},
        FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
        FieldDescriptor.TYPE_FLOAT: {"type": "number"},
        # The JSON mapping writes 64-bit integers as strings (JavaScript numbers lose precision) and reads both.
        FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "uint64"},
        FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
        FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    }
    if field.type not in scalar:
        raise ValueError(f"{field.full_name}: no JSON schema for proto type {field.type}")
    return scalar[field.type]
