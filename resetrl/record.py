"""What crosses the Redis queues, and its wire format.

Wire format (version 1), one msgpack map per stream entry, stored in the entry's field `r`:
    {"format": "resetrl", "version": 1, "kind": "experience" | "prompt",
     "fields": {<scalar fields: str, int, float, bool, None, lists and maps of those>},
     "tensors": {<name>: {"dtype": "int32"|"float32"|"uint8", "shape": [..], "data": <raw little-endian bytes>}}}
Nothing is pickled: decoding only builds numpy arrays from raw bytes of an allow-listed dtype.
A record whose format name or version differs, or whose bytes do not parse, raises WireFormatError.
"""

from __future__ import annotations

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
    """One trained trajectory (ALGORITHMS.md, "What crosses the queue")."""

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


_TENSOR_FIELDS = {
    "token_ids": np.int32,
    "loss_mask": np.uint8,
    "advantages": np.float32,
    "behaviour_logprobs": np.float32,
    "target_token_ids": np.int32,
}


def _pack_tensor(array: np.ndarray, dtype: type) -> dict:
    array = np.ascontiguousarray(array, dtype=dtype)
    return {"dtype": np.dtype(dtype).name, "shape": list(array.shape), "data": array.astype(array.dtype.newbyteorder("<")).tobytes()}


def _unpack_tensor(name: str, spec: Any) -> np.ndarray:
    try:
        dtype = _ALLOWED_DTYPES[spec["dtype"]]
        shape = tuple(int(s) for s in spec["shape"])
        array = np.frombuffer(spec["data"], dtype=np.dtype(dtype).newbyteorder("<"))
        return array.reshape(shape).astype(dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireFormatError(f"tensor '{name}' is malformed: {exc}") from exc


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
        raise WireFormatError(f"record format version {message.get('version')!r}; this code reads {WIRE_VERSION}")
    if message.get("kind") != kind:
        raise WireFormatError(f"expected a {kind} record, got {message.get('kind')!r}")
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
    message = _open(payload, "experience")
    values = dict(message.get("fields") or {})
    for name, spec in (message.get("tensors") or {}).items():
        if name not in _TENSOR_FIELDS:
            raise WireFormatError(f"unknown tensor field '{name}'")
        values[name] = _unpack_tensor(name, spec)
    try:
        return ExperienceRecord(**values)
    except TypeError as exc:
        raise WireFormatError(f"experience record fields do not match: {exc}") from exc


def encode_prompt(record: PromptRecord) -> bytes:
    return _envelope("prompt", dict(record.__dict__), {})


def decode_prompt(payload: bytes) -> PromptRecord:
    message = _open(payload, "prompt")
    try:
        return PromptRecord(**(message.get("fields") or {}))
    except TypeError as exc:
        raise WireFormatError(f"prompt record fields do not match: {exc}") from exc
