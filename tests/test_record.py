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


# ---- poison records: decodable msgpack that is not a valid record is refused at decode, with the reason ----------

def poisoned(edit) -> bytes:
    """A valid record's payload after `edit(message)` changed its decoded msgpack map."""
    message = msgpack.unpackb(encode_experience(make_record(target_token_ids=np.array([7, 8, 9], dtype=np.int32))),
                              raw=False)
    edit(message)
    return msgpack.packb(message, use_bin_type=True)


def set_field(name, value):
    return lambda message: message["fields"].__setitem__(name, value)


def set_tensor(name, array=None, **spec):
    def edit(message):
        if array is not None:
            message["tensors"][name] = {"dtype": array.dtype.name, "shape": list(array.shape),
                                        "data": array.astype(array.dtype.newbyteorder("<")).tobytes()}
        message["tensors"][name].update(spec)
    return edit


@pytest.mark.parametrize("edit, reason", [
    (set_field("policy_version", "7"), r"record 'p1@1-0#0': field 'policy_version' must be a non-negative integer, "
                                       r"got str '7'"),
    (set_field("policy_version", True), r"'policy_version' must be a non-negative integer, got bool True"),
    (set_field("policy_version", -1), r"'policy_version' must be a non-negative integer, got -1"),
    (set_field("prompt_length", 2.0), r"'prompt_length' must be a non-negative integer, got 2\.0"),
    (set_field("prompt_length", 6), r"prompt_length 6 is outside \[1, 5\]"),
    (set_field("prompt_length", 0), r"prompt_length 0 is outside \[1, 5\]"),
    (set_field("reward", float("nan")), r"field 'reward' must be a finite number, got nan"),
    (set_field("reward", "1.0"), r"field 'reward' must be a finite number, got str '1\.0'"),
    (set_field("temperature", float("inf")), r"field 'temperature' must be a finite number, got inf"),
    (set_field("temperature", 0.0), r"field 'temperature' must be > 0, got 0\.0"),
    (set_field("group_id", 12), r"field 'group_id' must be a string, got 12"),
    (set_field("metadata", [1]), r"field 'metadata' must be a map"),
    (set_field("step_boundaries", [2, "4"]), r"'step_boundaries' must be a list of integers"),
    (set_field("step_boundaries", [1, 4]), r"step_boundaries \[1, 4\] must increase and lie in \[prompt_length, "
                                           r"length\) = \[2, 5\)"),
    (set_field("step_boundaries", [2, 5]), r"step_boundaries \[2, 5\] must increase"),
    (set_field("step_boundaries", [4, 2]), r"step_boundaries \[4, 2\] must increase"),
    (set_field("surprise", 1), r"unknown field 'surprise'"),
    (lambda m: m["fields"].pop("reward"), r"missing field 'reward'"),
    (set_field("token_ids", [5, 6, 7, 8, 9]), r"field 'token_ids' is sent both as a field and as a tensor"),
    (set_tensor("advantages", np.zeros(5, dtype=np.float64)), r"tensor 'advantages' has dtype 'float64'; allowed"),
    (set_tensor("advantages", np.zeros(5, dtype=np.int32)), r"tensor 'advantages' has dtype int32; it must be float32"),
    (set_tensor("advantages", shape=[5, 1]), r"tensor 'advantages' has shape \[5, 1\]; it must be 1-D"),
    (set_tensor("advantages", shape=[-1]), r"tensor 'advantages' has shape \[-1\]; it must be 1-D"),
    (set_tensor("advantages", shape=[4]), r"tensor 'advantages' holds 20 bytes; shape \[4\] of float32 needs 16"),
    (set_tensor("advantages", data="abc"), r"tensor 'advantages' data is str, not raw bytes"),
    (lambda m: m["tensors"]["advantages"].pop("shape"),
     r"tensor 'advantages' is malformed: expected a map with dtype, shape and data"),
    (set_tensor("loss_mask", np.array([0, 0, 1], dtype=np.uint8)), r"loss_mask has 3 entries, token_ids has 5"),
    (set_tensor("loss_mask", np.array([0, 0, 1, 2, 1], dtype=np.uint8)), r"loss_mask holds values other than 0 and 1"),
    (set_tensor("advantages", np.array([0, 0, 0.5, np.nan, 0.5], dtype=np.float32)),
     r"advantages holds 1 non-finite values \(first at token 3: nan\)"),
    (set_tensor("behaviour_logprobs", np.array([0, 0, -1, -np.inf, np.inf], dtype=np.float32)),
     r"behaviour_logprobs holds 2 non-finite values \(first at token 3: -inf\)"),
    (set_tensor("token_ids", np.array([5, 6, -7, 8, 9], dtype=np.int32)), r"token_ids holds negative ids"),
    (set_tensor("token_ids", np.array([5, 6, 2**40, 8, 9], dtype=np.int64)), r"'token_ids' holds values outside int32"),
    (set_tensor("target_token_ids", np.array([7, 8], dtype=np.int32)),
     r"target_token_ids has 2 entries; the response \(token_ids after prompt_length\) has 3"),
    (set_tensor("weights", np.zeros(5, dtype=np.float32)), r"unknown tensor field 'weights'"),
    (lambda m: m.__setitem__("tensors", [1, 2]), r"'tensors' must be a map, got list"),
    (lambda m: m.__setitem__("fields", "x"), r"'fields' must be a map, got str"),
])
def test_a_poison_record_is_refused_at_decode_with_the_reason(edit, reason):
    with pytest.raises(WireFormatError, match=reason):
        decode_experience(poisoned(edit))


def test_the_poison_cases_start_from_a_record_that_decodes():
    # The parametrised cases above each change one thing of this payload: unchanged, it is accepted.
    record = decode_experience(poisoned(lambda message: None))
    assert record.policy_version == 3 and record.target_token_ids.tolist() == [7, 8, 9]


def test_int64_token_ids_are_read_as_int32():
    record = decode_experience(poisoned(set_tensor("token_ids", np.array([5, 6, 7, 8, 9], dtype=np.int64))))
    assert record.token_ids.dtype == np.int32 and record.token_ids.tolist() == [5, 6, 7, 8, 9]


def test_a_long_poison_value_is_shortened_in_the_reason():
    with pytest.raises(WireFormatError) as caught:
        decode_experience(poisoned(set_field("method", ["x" * 1000])))
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("name, value, reason", [
    ("question", 12, r"prompt field 'question' must be a string, got 12"),
    ("answer", None, r"prompt field 'answer' must be a string, got NoneType None"),
    ("metadata", "x", r"prompt field 'metadata' must be a map"),
])
def test_an_ill_typed_prompt_is_refused_at_decode(name, value, reason):
    message = msgpack.unpackb(encode_prompt(PromptRecord("p1", "2+3?", "5", "basic_arithmetic")), raw=False)
    message["fields"][name] = value
    with pytest.raises(WireFormatError, match=reason):
        decode_prompt(msgpack.packb(message, use_bin_type=True))
