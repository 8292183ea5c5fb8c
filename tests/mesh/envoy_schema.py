"""Envoy config validation without an Envoy binary, against the xds-protos schema.

`parse` loads YAML into an Envoy message with `json_format.ParseDict(ignore_unknown_fields=False)`,
which also resolves every typed `Any` (so every type URL must exist). `rule_violations` then walks
the parsed message, unpacking `Any`s, and checks the protoc-gen-validate rules Envoy's own protos
carry (required messages and oneofs, string/repeated/number/duration bounds, defined enums) and
deprecated fields. The PGV Python validator does not run on protobuf 7 (it reads the removed
FieldDescriptor.label), hence this walker over the same annotations.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf import any_pb2, duration_pb2, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.descriptor_pool import Default as default_pool
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


@cache
def load_envoy_types() -> int:
    """Import every Envoy proto module, as an Envoy binary links every extension. Returns how
    many modules were imported."""
    import envoy

    count = 0
    for info in pkgutil.walk_packages(envoy.__path__, "envoy."):
        if info.name.endswith("_pb2"):
            importlib.import_module(info.name)
            count += 1
    return count


def parse(document: Mapping[str, Any], message: M) -> M:
    """ParseDict, failing on unknown fields and unresolvable `@type`s."""
    load_envoy_types()
    json_format.ParseDict(document, message, ignore_unknown_fields=False)
    return message


def parse_yaml(path: Path, message: M) -> M:
    return parse(yaml.safe_load(path.read_text()), message)


def _unpack(value: any_pb2.Any) -> Message:
    name = value.TypeName()
    cls = message_factory.GetMessageClass(default_pool().FindMessageTypeByName(name))
    inner = cls()
    if not value.Unpack(inner):
        raise ValueError(f"cannot unpack {value.type_url}")
    return inner


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _scalar_rules(rules: Message, value: Any, kind: str, where: str) -> Iterator[str]:
    bound = getattr(rules, kind)
    for name, check in (
        ("gt", lambda v, b: v > b),
        ("gte", lambda v, b: v >= b),
        ("lt", lambda v, b: v < b),
        ("lte", lambda v, b: v <= b),
    ):
        if bound.HasField(name):
            limit = getattr(bound, name)
            if kind == "duration":
                limit = _seconds(limit)
            if not check(value, limit):
                yield f"{where}: {value} must be {name} {limit}"


_NUMBER_KINDS = {"uint32", "uint64", "int32", "int64", "double", "float", "sint32", "sint64"}


def _field_rules(field: FieldDescriptor) -> Message | None:
    from validate import validate_pb2

    options = field.GetOptions()
    if not options.HasExtension(validate_pb2.rules):
        return None
    rules: Message = options.Extensions[validate_pb2.rules]
    return rules


def _is_deprecated(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().deprecated)


def _is_repeated(field: FieldDescriptor) -> bool:
    # FieldDescriptor.label is gone in protobuf 7; is_repeated replaced it.
    return bool(getattr(field, "is_repeated", False))


def rule_violations(message: Message, where: str = "") -> list[str]:
    """Every PGV rule and deprecation the message (recursively, Anys unpacked) violates."""
    return list(_walk(message, where or message.DESCRIPTOR.name))


def _walk(message: Message, where: str) -> Iterator[str]:
    if isinstance(message, any_pb2.Any):
        yield from _walk(_unpack(message), f"{where}<{message.TypeName()}>")
        return
    descriptor: Descriptor = message.DESCRIPTOR
    yield from _oneof_rules(message, descriptor, where)
    for field in descriptor.fields:
        path = f"{where}.{field.name}"
        repeated = _is_repeated(field)
        present = len(getattr(message, field.name)) > 0 if repeated else _has(message, field)
        if present and _is_deprecated(field):
            yield f"{path}: deprecated field"
        rules = _field_rules(field)
        # A oneof member's rules apply only when that member is the one set.
        if rules is not None and (present or field.containing_oneof is None):
            yield from _check(message, field, rules, path, present, repeated)
        if not present or field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        value = getattr(message, field.name)
        if field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    yield from _walk(item, f"{path}[{key!r}]")
        elif repeated:
            for i, item in enumerate(value):
                yield from _walk(item, f"{path}[{i}]")
        else:
            yield from _walk(value, path)


def _has(message: Message, field: FieldDescriptor) -> bool:
    if field.type == FieldDescriptor.TYPE_MESSAGE or field.containing_oneof is not None:
        return message.HasField(field.name)
    return bool(getattr(message, field.name))


def _oneof_rules(message: Message, descriptor: Descriptor, where: str) -> Iterator[str]:
    from validate import validate_pb2

    for oneof in descriptor.oneofs:
        options = oneof.GetOptions()
        required = (
            options.HasExtension(validate_pb2.required)
            and options.Extensions[validate_pb2.required]
        )
        if required and message.WhichOneof(oneof.name) is None:
            yield f"{where}: one of {[f.name for f in oneof.fields]} is required"


def _check(
    message: Message,
    field: FieldDescriptor,
    rules: Any,
    path: str,
    present: bool,
    repeated: bool,
) -> Iterator[str]:
    kind = rules.WhichOneof("type")
    if rules.HasField("message") and rules.message.required and not present:
        yield f"{path}: required"
    if kind is None:
        return
    value = getattr(message, field.name)
    if kind == "repeated":
        if rules.repeated.min_items and len(value) < rules.repeated.min_items:
            yield f"{path}: needs at least {rules.repeated.min_items} item(s)"
        return
    # Absent messages are only checked by `required`; proto3 scalars always have a value.
    if repeated or (not present and field.type == FieldDescriptor.TYPE_MESSAGE):
        return
    if kind == "string":
        if rules.string.min_len and len(value) < rules.string.min_len:
            yield f"{path}: must be at least {rules.string.min_len} character(s)"
        if rules.string.HasField("max_len") and len(value) > rules.string.max_len:
            yield f"{path}: must be at most {rules.string.max_len} characters"
    elif kind in _NUMBER_KINDS:
        yield from _scalar_rules(rules, value, kind, path)
    elif kind == "duration" and isinstance(value, duration_pb2.Duration):
        yield from _scalar_rules(rules, _seconds(value), kind, path)
    elif (
        kind == "enum" and rules.enum.defined_only and value not in field.enum_type.values_by_number
    ):
        yield f"{path}: {value} is not a defined {field.enum_type.name}"


def typed_configs(message: Message) -> Iterator[str]:
    """Every type URL inside `message`, recursively (to assert what was resolved)."""
    if isinstance(message, any_pb2.Any):
        yield message.TypeName()
        yield from typed_configs(_unpack(message))
        return
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        elif _is_repeated(field):
            items = list(value)
        else:
            items = [value]
        for item in items:
            yield from typed_configs(item)
