"""Step splitting: character spans of the reasoning steps, and the token offsets where each step starts."""

from __future__ import annotations

import pytest

from resetrl.algorithms.steps import split_steps, token_step_starts


def step_texts(text, spans):
    return [text[start:end] for start, end in spans]


def assert_contiguous(text, spans):
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(end == next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


# ---------------------------------------------------------------- split_steps


def test_delimiters_close_steps_and_the_answer_line_is_a_step_of_its_own():
    text = "Let x = 3.</step>\nThen 2x = 6.</step>\nFinal answer: 6"
    spans = split_steps(text)
    # "Let x = 3.</step>" is 10 + 7 = 17 characters; "\nThen 2x = 6.</step>" is 1 + 12 + 7 = 20
    assert spans == [(0, 17), (17, 37), (37, len(text))]
    assert step_texts(text, spans) == ["Let x = 3.</step>", "\nThen 2x = 6.</step>", "\nFinal answer: 6"]


def test_trailing_whitespace_joins_the_last_step():
    text = "A.</step>\nB.</step>\n\n  "
    spans = split_steps(text)
    assert step_texts(text, spans) == ["A.</step>", "\nB.</step>\n\n  "]
    assert_contiguous(text, spans)


def test_a_blank_step_between_delimiters_joins_its_neighbour():
    text = "A.</step>\n</step>B.</step>"
    assert step_texts(text, split_steps(text)) == ["A.</step>\n</step>", "B.</step>"]
    text = "</step>A.</step>B."
    assert step_texts(text, split_steps(text)) == ["</step>A.</step>", "B."]


def test_a_custom_delimiter():
    text = "x = 1 ## y = 2 ## so 3"
    assert step_texts(text, split_steps(text, delimiter="##")) == ["x = 1 ##", " y = 2 ##", " so 3"]
    with pytest.raises(ValueError, match="delimiter"):
        split_steps(text, delimiter="")


def test_without_delimiters_blank_lines_split_and_stay_with_the_step_before():
    text = "First, expand. Then collect.\n\nSimplify: 2x = 6.\n \n\nAnswer: 3"
    spans = split_steps(text)
    # sentences inside a paragraph are not split once blank lines give more than one step
    assert step_texts(text, spans) == ["First, expand. Then collect.\n\n", "Simplify: 2x = 6.\n \n\n", "Answer: 3"]
    assert_contiguous(text, spans)


def test_without_blank_lines_sentence_ends_split():
    text = "Add 2 and 3. That gives 5! Is it odd? Yes."
    assert step_texts(text, split_steps(text)) == ["Add 2 and 3. ", "That gives 5! ", "Is it odd? ", "Yes."]


def test_a_decimal_point_is_not_a_sentence_end():
    text = "Take 3.5 and double it. Get 7."
    assert step_texts(text, split_steps(text)) == ["Take 3.5 and double it. ", "Get 7."]


def test_trailing_blank_lines_alone_do_not_make_steps_so_sentences_split():
    text = "One. Two.\n\n"
    assert step_texts(text, split_steps(text)) == ["One. ", "Two.\n\n"]


@pytest.mark.parametrize("text", ["x = 42", "  \n", "42."])
def test_text_with_nothing_to_split_on_is_one_step(text):
    assert split_steps(text) == [(0, len(text))]


def test_empty_text_has_no_steps():
    assert split_steps("") == []


# ---------------------------------------------------------------- token_step_starts


@pytest.fixture(scope="module")
def tokenizer():
    from resetrl.models import smollm2_tokenizer

    return smollm2_tokenizer("~/.cache/resetrl/models")


def test_token_starts_with_the_smollm2_tokenizer(tokenizer):
    text = "Let x = 3.</step>\nThen 2x = 6, so the café bill is 6 ✓.</step>\n\nFinal answer: 6"
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    starts = token_step_starts(token_ids, decode)
    # "Let", " x", " =", " ", "3", ".", "</", "step", ">" are the first step's 9 tokens; "\n" opens the second
    assert starts[:2] == [0, 9]
    bounds = [*starts, len(token_ids)]
    pieces = [decode(token_ids[start:end]) for start, end in zip(bounds, bounds[1:])]
    assert pieces == step_texts(text, split_steps(text))
    assert len(pieces) == 3
    assert token_ids[-1] == tokenizer.eos_token_id  # the end-of-sequence token stays in the last step


def test_a_token_straddling_a_boundary_belongs_to_the_step_it_starts_in():
    vocab = ["A.</", "step>\n", "B.</step", ">\nC"]

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    # text "A.</step>\nB.</step>\nC": steps start at characters 0, 9 and 19. "step>\n" (characters 4..10) starts
    # in step 1, so step 2 starts at token 2; ">\nC" (characters 18..21) starts in step 2, so step 3 has no token
    # of its own and merges into step 2.
    assert token_step_starts([0, 1, 2, 3], decode) == [0, 2]


def test_steps_inside_one_token_merge():
    vocab = ["A.</step>", "B.</step>C.</step>", "D"]

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    # steps "A.</step>" | "B.</step>" | "C.</step>" | "D": C starts inside token 1, which starts in B, so C has no
    # token of its own and merges into B; D starts at token 2
    assert token_step_starts([0, 1, 2], decode) == [0, 1, 2]
    bounds = [0, 1, 2, 3]
    assert [decode([0, 1, 2][a:b]) for a, b in zip(bounds, bounds[1:])] == ["A.</step>", "B.</step>C.</step>", "D"]


def test_a_decode_that_is_not_prefix_monotone():
    # Byte tokens decoded with backslashreplace: a prefix that ends inside a multi-byte character shows its bytes
    # as "\xe2" escapes, longer than the character itself, so len(decode(prefix)) goes up and down.
    text = "a∎bé∎c"  # steps "a∎" | "bé∎" | "c" with "∎" (3 bytes) as the delimiter
    token_ids = list(text.encode())

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="backslashreplace")

    assert len(decode(token_ids[:2])) == 5 > len(decode(token_ids[:4])) == 2  # "a\xe2" vs "a∎"
    # byte offsets: a 0, ∎ 1-3, b 4, é 5-6, ∎ 7-9, c 10
    starts = token_step_starts(token_ids, decode, delimiter="∎")
    assert starts == [0, 4, 10]
    bounds = [*starts, len(token_ids)]
    assert [decode(token_ids[a:b]) for a, b in zip(bounds, bounds[1:])] == ["a∎", "bé∎", "c"]


def test_one_step_and_no_tokens():
    def decode(ids):
        return "".join(chr(i) for i in ids)

    assert token_step_starts([ord(c) for c in "x = 42"], decode) == [0]
    assert token_step_starts([], decode) == []
