"""What crosses the Redis queues, and its wire format.

Wire format (version 1), one msgpack map per stream entry, stored in the entry's field `r`:
    {"format": "resetrl", "version": 1, "kind": "experience" | "prompt",
     "fields": {<scalar fields: str, int, float, bool, None, lists and maps of those>},
     "tensors": {<name>: {"dtype": "int32"|"float32"|"uint8", "shape": [..], "data": <raw little-endian bytes>}}}
Nothing is pickled: decoding only builds numpy arrays from raw bytes of an allow-listed dtype.
A record whose format name or version differs, or whose bytes do not parse, raises WireFormatError.

Decoding also validates what it builds (a poison record must be refused with its reason, never raise later in the
learner and crash-loop it on every restart): each field's type (`policy_version` "7" is refused, bool is not an
int), each tensor's dtype (a per-field allow-list: token ids int32 or int64, read as int32; loss_mask uint8;
advantages and behaviour log-probs float32), shape (1-D, a size that matches its bytes) and length
(loss_mask, advantages and behaviour_logprobs as long as token_ids; target_token_ids as long as the response),
prompt_length and step_boundaries inside the record, and finite values (advantages, behaviour log-probs, reward,
temperature > 0). The queue's consumers dead-letter a WireFormatError with its message.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

WIRE_FORMAT = "resetrl"
WIRE_VERSION = 1
_ALLOWED_DTYPES = {"int32": np.int32, "int64": np.int64, "float32": np.float32, "uint8": np.uint8}


class WireFormatError(ValueError):
    """A queue entry that is not a valid resetrl record of a version this code reads."""


@dataclass
class PromptRecord:
    prompt_id: str
    question: str
    answer: str
    task: str
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. the reasoning-gym entry, for scoring


@dataclass
class ExperienceRecord:
    """One trained trajectory (docs/algorithms.md, "What crosses the queue")."""

    record_id: str
    prompt_id: str
    group_id: str
    method: str
    policy_version: int
    token_ids: np.ndarray  # int32 [T]: prompt + response
    prompt_length: int
    loss_mask: np.ndarray  # uint8 [T]: 1 where the token is trained on
    advantages: np.ndarray  # float32 [T]
    behaviour_logprobs: np.ndarray  # float32 [T]: 0 on prompt tokens
    reward: float
    temperature: float
    step_boundaries: list[int] = field(default_factory=list)  # token offsets where each step starts
    target_token_ids: np.ndarray | None = None  # int32: expert solution tokens (SuperRL / SRL)
    finish_reason: str = "stop"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        length = len(self.token_ids)
        for name in ("loss_mask", "advantages", "behaviour_logprobs"):
            if len(getattr(self, name)) != length:
                raise WireFormatError(f"{name} has {len(getattr(self, name))} entries, token_ids has {length}")

    @property
    def num_response_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_length


# What each tensor field is written as, and the dtypes a reader accepts for it (cast to the first).
_TENSOR_FIELDS = {
    "token_ids": np.int32,
    "loss_mask": np.uint8,
    "advantages": np.float32,
    "behaviour_logprobs": np.float32,
    "target_token_ids": np.int32,
}
_ACCEPTED_DTYPES = {
    "token_ids": ("int32", "int64"),
    "loss_mask": ("uint8",),
    "advantages": ("float32",),
    "behaviour_logprobs": ("float32",),
    "target_token_ids": ("int32", "int64"),
}
_STRING_FIELDS = ("record_id", "prompt_id", "group_id", "method", "finish_reason")
_REQUIRED_EXPERIENCE = {
    f.name for f in dataclasses.fields(ExperienceRecord)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
}
_KNOWN_EXPERIENCE = {f.name for f in dataclasses.fields(ExperienceRecord)}


def msgpack_safe(value: Any) -> Any:
    """The value as the wire format can carry it: tuples and sets become lists, map keys become str, numpy arrays
    and scalars become lists and numbers, anything else its str."""
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {str(key): msgpack_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [msgpack_safe(item) for item in value]
    if isinstance(value, (set, frozenset)):
        items = [msgpack_safe(item) for item in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return msgpack_safe(value.tolist())
    return str(value)


def _pack_tensor(array: np.ndarray, dtype: type) -> dict:
    array = np.ascontiguousarray(array, dtype=dtype)
    return {"dtype": np.dtype(dtype).name, "shape": list(array.shape), "data": array.astype(array.dtype.newbyteorder("<")).tobytes()}


def _unpack_tensor(name: str, spec: Any) -> np.ndarray:
    """A 1-D array of the field's dtype from {"dtype", "shape", "data"}; every way it can be wrong is refused."""
    if not isinstance(spec, dict) or not {"dtype", "shape", "data"} <= spec.keys():
        raise WireFormatError(f"tensor '{name}' is malformed: expected a map with dtype, shape and data")
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if dtype not in _ALLOWED_DTYPES:
        raise WireFormatError(f"tensor '{name}' has dtype {_brief(dtype)}; allowed: {', '.join(_ALLOWED_DTYPES)}")
    if dtype not in _ACCEPTED_DTYPES[name]:
        raise WireFormatError(f"tensor '{name}' has dtype {dtype}; it must be {' or '.join(_ACCEPTED_DTYPES[name])}")
    if not (isinstance(shape, list) and len(shape) == 1 and _is_int(shape[0]) and shape[0] >= 0):
        raise WireFormatError(f"tensor '{name}' has shape {_brief(shape)}; it must be 1-D: [length]")
    if not isinstance(data, bytes):
        raise WireFormatError(f"tensor '{name}' data is {type(data).__name__}, not raw bytes")
    itemsize = np.dtype(_ALLOWED_DTYPES[dtype]).itemsize
    if len(data) != shape[0] * itemsize:
        raise WireFormatError(
            f"tensor '{name}' holds {len(data)} bytes; shape [{shape[0]}] of {dtype} needs {shape[0] * itemsize}"
        )
    array = np.frombuffer(data, dtype=np.dtype(_ALLOWED_DTYPES[dtype]).newbyteorder("<"))
    wanted = _TENSOR_FIELDS[name]
    if dtype != np.dtype(wanted).name:
        info = np.iinfo(wanted)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise WireFormatError(f"tensor '{name}' holds values outside {np.dtype(wanted).name}")
    return array.astype(wanted)  # a native-endian, writable copy


def _envelope(kind: str, fields: dict, tensors: dict) -> bytes:
    return msgpack.packb(
        {"format": WIRE_FORMAT, "version": WIRE_VERSION, "kind": kind, "fields": fields, "tensors": tensors},
        use_bin_type=True,
    )


def _open(payload: bytes, kind: str) -> dict:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireFormatError(f"not a msgpack record: {exc}") from exc
    if not isinstance(message, dict) or message.get("format") != WIRE_FORMAT:
        raise WireFormatError("not a resetrl record (format name missing)")
    if message.get("version") != WIRE_VERSION:
        raise WireFormatError(f"record format version {_show(message.get('version'))}; this code reads {WIRE_VERSION}")
    if message.get("kind") != kind:
        raise WireFormatError(f"expected a {kind} record, got {_show(message.get('kind'))}")
    for part in ("fields", "tensors"):
        if not isinstance(message.get(part, {}), dict):
            raise WireFormatError(f"'{part}' must be a map, got {type(message[part]).__name__}")
    return message


def encode_experience(record: ExperienceRecord) -> bytes:
    tensors = {}
    fields = {}
    for name, value in record.__dict__.items():
        if name in _TENSOR_FIELDS:
            if value is not None:
                tensors[name] = _pack_tensor(value, _TENSOR_FIELDS[name])
        else:
            fields[name] = value
    return _envelope("experience", fields, tensors)


def decode_experience(payload: bytes) -> ExperienceRecord:
    """The record in `payload`, validated (module docstring); WireFormatError with the reason otherwise."""
    message = _open(payload, "experience")
    values = dict(message.get("fields") or {})
    label = f"record {_brief(values['record_id'])}: " if isinstance(values.get("record_id"), str) else ""
    try:
        for name, spec in (message.get("tensors") or {}).items():
            if name not in _TENSOR_FIELDS:
                raise WireFormatError(f"unknown tensor field '{name}'")
            if name in values:
                raise WireFormatError(f"field '{name}' is sent both as a field and as a tensor")
            values[name] = _unpack_tensor(name, spec)
        _check_experience(values)
        return ExperienceRecord(**values)
    except WireFormatError as exc:
        raise WireFormatError(f"{label}{exc}") from None


def _check_experience(values: dict) -> None:
    unknown = sorted(values.keys() - _KNOWN_EXPERIENCE)
    if unknown:
        raise WireFormatError(f"unknown field {', '.join(map(repr, unknown))}")
    missing = sorted(_REQUIRED_EXPERIENCE - values.keys())
    if missing:
        raise WireFormatError(f"missing field {', '.join(map(repr, missing))}")
    for name in _STRING_FIELDS:
        if name in values and not isinstance(values[name], str):
            raise WireFormatError(f"field '{name}' must be a string, got {_show(values[name])}")
    for name in ("policy_version", "prompt_length"):
        if not _is_int(values[name]) or values[name] < 0:
            raise WireFormatError(f"field '{name}' must be a non-negative integer, got {_show(values[name])}")
    for name in ("reward", "temperature"):
        value = values[name]
        if not (_is_number(value) and math.isfinite(value)):
            raise WireFormatError(f"field '{name}' must be a finite number, got {_show(value)}")
    if values["temperature"] <= 0:
        raise WireFormatError(f"field 'temperature' must be > 0, got {values['temperature']}")
    if not isinstance(values.get("metadata", {}), dict):
        raise WireFormatError(f"field 'metadata' must be a map, got {_show(values['metadata'])}")

    length = len(values["token_ids"])
    for name in ("loss_mask", "advantages", "behaviour_logprobs"):
        if len(values[name]) != length:
            raise WireFormatError(f"{name} has {len(values[name])} entries, token_ids has {length}")
    prompt_length = values["prompt_length"]
    if not 1 <= prompt_length <= length:
        raise WireFormatError(f"prompt_length {prompt_length} is outside [1, {length}] (the record has {length} "
                              "tokens)")
    if length and values["token_ids"].min() < 0:
        raise WireFormatError("token_ids holds negative ids")
    if (values["loss_mask"] > 1).any():
        raise WireFormatError("loss_mask holds values other than 0 and 1")
    for name in ("advantages", "behaviour_logprobs"):
        bad = np.flatnonzero(~np.isfinite(values[name]))
        if bad.size:
            first = bad[0]
            raise WireFormatError(f"{name} holds {bad.size} non-finite values (first at token {first}: "
                                  f"{values[name][first]})")
    target = values.get("target_token_ids")
    if target is not None and len(target) != length - prompt_length:
        raise WireFormatError(
            f"target_token_ids has {len(target)} entries; the response (token_ids after prompt_length) has "
            f"{length - prompt_length}"
        )
    boundaries = values.get("step_boundaries", [])
    if not isinstance(boundaries, list) or not all(_is_int(b) for b in boundaries):
        raise WireFormatError(f"field 'step_boundaries' must be a list of integers, got {_show(boundaries)}")
    # Steps start inside the response, in order (actors/trajectories.py: prompt_length + token_step_starts).
    inside = all(prompt_length <= b < length for b in boundaries)
    if not inside or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise WireFormatError(
            f"step_boundaries {_brief(boundaries)} must increase and lie in [prompt_length, length) = "
            f"[{prompt_length}, {length})"
        )


def encode_prompt(record: PromptRecord) -> bytes:
    return _envelope("prompt", dict(record.__dict__), {})


def decode_prompt(payload: bytes) -> PromptRecord:
    """The prompt in `payload`, its field types checked; WireFormatError with the reason otherwise."""
    message = _open(payload, "prompt")
    values = message.get("fields") or {}
    try:
        prompt = PromptRecord(**values)
    except TypeError as exc:
        raise WireFormatError(f"prompt record fields do not match: {exc}") from exc
    for name in ("prompt_id", "question", "answer", "task"):
        if not isinstance(getattr(prompt, name), str):
            raise WireFormatError(f"prompt field '{name}' must be a string, got {_show(getattr(prompt, name))}")
    if not isinstance(prompt.metadata, dict):
        raise WireFormatError(f"prompt field 'metadata' must be a map, got {_show(prompt.metadata)}")
    return prompt


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _brief(value: Any, limit: int = 60) -> str:
    """A short repr for an error message (a poison record may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """A value for a type error: its type and a short repr ("str '7'"), numbers as they are."""
    if _is_number(value):
        return _brief(value)
    return f"{type(value).__name__} {_brief(value)}"
