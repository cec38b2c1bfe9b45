"""hypothesis strategies for protobuf messages, built from their descriptors: every field may be
set, to any value of its type (strings of any code point, integers at their type's limits,
nested messages, repeated fields, maps, Any with any type URL and bytes)."""
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

_INTS = {
    F.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), F.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    F.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1), F.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    F.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1), F.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    F.TYPE_UINT32: (0, (1 << 32) - 1), F.TYPE_FIXED32: (0, (1 << 32) - 1),
    F.TYPE_UINT64: (0, (1 << 64) - 1), F.TYPE_FIXED64: (0, (1 << 64) - 1),
}


def scalar(field, strings=None):
    t = field.type
    if t in _INTS:
        lo, hi = _INTS[t]
        return st.one_of(st.sampled_from([lo, hi, 0, 1, -1 if lo < 0 else 2]), st.integers(lo, hi))
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(width=32 if t == F.TYPE_FLOAT else 64)
    if t == F.TYPE_STRING:
        return strings if strings is not None else st.text(max_size=40)
    if t == F.TYPE_BYTES:
        return st.binary(max_size=80)
    if t == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 100))
    raise TypeError(f"field {field.full_name}: type {t}")


def messages(cls, depth=3, overrides=None):
    """Instances of protobuf class `cls`; `overrides` maps a field name to the strategy for it
    (at the top level only)."""
    overrides = overrides or {}
    desc = cls.DESCRIPTOR

    @st.composite
    def build(draw):
        msg = cls()
        for field in desc.fields:
            if field.name in overrides:
                value = draw(overrides[field.name])
                if value is not None:
                    _assign(msg, field, value)
                continue
            if not draw(st.booleans()):
                continue
            _assign(msg, field, draw(value_of(field, depth)))
        return msg

    return build()


def value_of(field, depth):
    if field.message_type is not None:
        mt = field.message_type
        if mt.GetOptions().map_entry:
            key, value = mt.fields_by_name["key"], mt.fields_by_name["value"]
            return st.dictionaries(scalar(key), _element(value, depth), max_size=3)
        element = _element(field, depth)
    else:
        element = scalar(field)
    if _repeated(field):
        return st.lists(element, max_size=3)
    return element


def _element(field, depth):
    if field.message_type is None:
        return scalar(field)
    if field.message_type.full_name == "google.protobuf.Any":
        from google.protobuf.any_pb2 import Any
        return st.builds(Any, type_url=st.one_of(st.text(max_size=60), st.sampled_from(TYPE_URLS)),
                         value=st.binary(max_size=120))
    if depth <= 0:
        return st.just(_class_of(field.message_type)())
    return messages(_class_of(field.message_type), depth - 1)


TYPE_URLS = ["containerd.runc.v1.Options", "containerd.linux.runc.CreateOptions",
             "runtimeoptions.v1.Options", "containerd.runc.v1.CheckpointOptions",
             "types.containerd.io/opencontainers/runtime-spec/1/Process",
             "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"]


def _repeated(field):
    is_repeated = getattr(field, "is_repeated", None)  # protobuf 6.31+; `label` is deprecated
    return is_repeated if isinstance(is_repeated, bool) else field.label == F.LABEL_REPEATED


def _class_of(descriptor):
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(descriptor)


def _assign(msg, field, value):
    target = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for k, v in value.items():
            if field.message_type.fields_by_name["value"].message_type is not None:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif _repeated(field):
        if field.message_type is not None:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(msg, field.name, value)
