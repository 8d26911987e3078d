"""A JSON-friendly summary of a protobuf file's messages, enums and RPCs (for spec checks).

Imports only google.protobuf, so a separate process can summarise tritonclient's generated
files without loading ours (both define the ``inference`` package).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor


def _message_shape(desc: Descriptor) -> dict[str, Any]:
    fields = {f.name: [f.number, f.type, f.is_repeated,
                       f.message_type.full_name if f.message_type else
                       f.enum_type.full_name if f.enum_type else ""]
              for f in desc.fields}
    return {"fields": fields, "oneofs": {o.name: sorted(f.name for f in o.fields)
                                         for o in desc.oneofs}}


def walk(file: FileDescriptor) -> dict[str, Any]:
    """Every message, enum and RPC of a file, by full name, in a JSON-friendly form."""
    shapes: dict[str, Any] = {}

    def enum(desc: EnumDescriptor) -> None:
        shapes[desc.full_name] = {v.name: v.number for v in desc.values}

    def message(desc: Descriptor) -> None:
        shapes[desc.full_name] = _message_shape(desc)
        for nested in desc.nested_types:
            message(nested)
        for nested_enum in desc.enum_types:
            enum(nested_enum)

    for desc in file.message_types_by_name.values():
        message(desc)
    for enum_desc in file.enum_types_by_name.values():
        enum(enum_desc)
    for service in file.services_by_name.values():
        for method in service.methods:
            shapes[method.full_name] = [method.input_type.full_name,
                                        method.output_type.full_name]
    return shapes


