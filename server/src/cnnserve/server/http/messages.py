"""Protocol messages as the JSON the REST protocol answers with.

The REST answers are the gRPC answers written as JSON (field names as in the .proto, enums by
name, 64-bit integers as numbers, scalars present even when zero), so both protocols report
the same metadata, configuration and statistics from one source (the gRPC servicer).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def to_json(message: Message) -> dict[str, Any]:
    """``message`` as a JSON-ready dict (unset sub-messages and oneof members left out)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if _is_map(field):
            entry = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _value(entry, item) for key, item in value.items()}
        elif _repeated(field):
            out[field.name] = [_value(field, item) for item in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE or field.containing_oneof is not None:
            if message.HasField(field.name):
                out[field.name] = _value(field, value)
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("latin-1")
    return value


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)  # protobuf >= 6 (the pinned range); label() is deprecated


def _is_map(field: FieldDescriptor) -> bool:
    return (field.type == FieldDescriptor.TYPE_MESSAGE and _repeated(field)
            and field.message_type.GetOptions().map_entry)
