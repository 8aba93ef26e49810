"""The queue's wire format: msgpack + raw tensor bytes, versioned, no pickle."""

import msgpack
import numpy as np
import pytest

from resetrl.record import (
    ExperienceRecord,
    PromptRecord,
    WireFormatError,
    decode_experience,
    decode_prompt,
    encode_experience,
    encode_prompt,
)


def make_record(**changes) -> ExperienceRecord:
    fields = dict(
        record_id="p1@1-0#0", prompt_id="p1", group_id="p1@1-0", method="grpo", policy_version=3,
        token_ids=np.array([5, 6, 7, 8, 9], dtype=np.int32), prompt_length=2,
        loss_mask=np.array([0, 0, 1, 1, 1], dtype=np.uint8),
        advantages=np.array([0, 0, 0.5, 0.5, 0.5], dtype=np.float32),
        behaviour_logprobs=np.array([0, 0, -1.25, -0.5, -2.0], dtype=np.float32),
        reward=1.0, temperature=0.7, step_boundaries=[2, 4], metadata={"task": "chain_sum"},
    )
    fields.update(changes)
    return ExperienceRecord(**fields)


def test_experience_round_trip_keeps_every_field_and_dtype():
    record = make_record(target_token_ids=np.array([1, 2, 3], dtype=np.int32))
    back = decode_experience(encode_experience(record))
    for name, value in record.__dict__.items():
        got = getattr(back, name)
        if isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and np.array_equal(got, value), name
        else:
            assert got == value, name


def test_optional_tensor_absent_stays_none():
    assert decode_experience(encode_experience(make_record())).target_token_ids is None


def test_prompt_round_trip():
    prompt = PromptRecord("p1", "What is 2+3?", "5", "basic_arithmetic", {"num_terms": 2, "ops": ["+"]})
    assert decode_prompt(encode_prompt(prompt)) == prompt


def test_payload_is_plain_msgpack_with_a_version():
    message = msgpack.unpackb(encode_experience(make_record()), raw=False)
    assert message["format"] == "resetrl" and message["version"] == 1 and message["kind"] == "experience"
    assert message["tensors"]["token_ids"]["dtype"] == "int32"
    assert message["tensors"]["token_ids"]["data"] == np.array([5, 6, 7, 8, 9], dtype="<i4").tobytes()


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\x80\x04\x95garbage-pickle", "not a msgpack record|not a resetrl record"),
        (msgpack.packb({"format": "resetrl", "version": 99, "kind": "experience"}), "version 99"),
        (msgpack.packb({"format": "other"}), "not a resetrl record"),
        (msgpack.packb([1, 2, 3]), "not a resetrl record"),
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(WireFormatError, match=reason):
        decode_experience(payload)


def test_unlisted_dtype_is_rejected():
    message = msgpack.unpackb(encode_experience(make_record()), raw=False)
    message["tensors"]["token_ids"]["dtype"] = "object"
    with pytest.raises(WireFormatError, match="token_ids"):
        decode_experience(msgpack.packb(message, use_bin_type=True))


def test_prompt_record_is_not_read_as_experience():
    with pytest.raises(WireFormatError, match="expected a experience record"):
        decode_experience(encode_prompt(PromptRecord("p", "q", "a", "t")))


def test_mismatched_lengths_are_rejected():
    with pytest.raises(WireFormatError, match="loss_mask"):
        make_record(loss_mask=np.array([1, 1], dtype=np.uint8))
