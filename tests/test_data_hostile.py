"""Hostile JSONL files: every kind of bad line, at random (seeded) positions, gets FILE:LINE: what; the fix, or is
skipped and counted with data.skip_bad_rows; a byte-order mark, CRLF line ends and blank lines are accepted."""

from __future__ import annotations

import json
import random
import re

import pytest

from resetrl.config import DataConfig
from resetrl.data import build_prompts
from resetrl.problem_files import BadRowError, load_problems

MIB = 1 << 20
BOM = b"\xef\xbb\xbf"

# Each bad line and what its message must say after "FILE:LINE".
BAD_LINES = {
    "not utf-8": (b'{"problem": "caf\xe9 + 1?", "answer": "2"}',
                  r": not UTF-8 \(byte 0xe9 at byte 17 of the line\); save the file as UTF-8"),
    "truncated": (b'{"problem": "2+3?", "answer": ',
                  r":31: invalid JSON \(Expecting value\); the line ends before its JSON does"),
    "unterminated string": (b'{"problem": "2+3?", "answer": "5',
                            r":31: invalid JSON \(Unterminated string starting at\); the line ends before its JSON does"),
    "two objects": (b'{"problem": "a", "answer": "1"} {"problem": "b", "answer": "2"}',
                    r":33: invalid JSON \(Extra data\); the line holds more than one JSON value: put one object per line"),
    "bom inside": (b'{"problem": "a", "answer": "1"}' + BOM + b'{"problem": "b", "answer": "2"}',
                   r":32: invalid JSON \(Extra data\); a byte-order mark sits inside the line, where two files were "
                   r"joined without a line end"),
    "not an object": (b"[1, 2]", r": a row must be an object with the problem and its answer, got list \[1, 2\]"),
    "list problem": (b'{"problem": ["2+3?"], "answer": "5"}',
                     r": column 'problem' must be a non-empty string, got list \['2\+3\?'\]; fix the row"),
    "bool answer": (b'{"problem": "2+3?", "answer": true}',
                    r": column 'answer' must be a non-empty string, got bool True; fix the row"),
    "nan answer": (b'{"problem": "2+3?", "answer": NaN}', r": column 'answer' is nan; it must be text or a finite number"),
    "no answer": (b'{"problem": "2+3?"}', r": column 'answer' missing or empty; give the row an answer, or set "
                                          r"data\.answer_key"),
    "no question": (b'{"prompt": "2+3?", "answer": "5"}',
                    r": column 'problem' missing; set data\.question_key to the column holding the problem "
                    r"\(this row has columns \['prompt', 'answer'\]\)"),
    "deeply nested": (b"[" * 100_000, r": the JSON is nested too deeply to read"),
    "multi-megabyte": (b'{"problem": "' + b"9" * (3 * MIB) + b'", "answer": "1"}',
                       r": the line is 3\.0 MiB, over data\.max_row_bytes \(1\.0 MiB\); a row that long is usually "
                       r"many rows whose line ends were lost: fix the line ends, or raise data\.max_row_bytes"),
}
SKIP_HINT = r"; or set data\.skip_bad_rows=true to skip and count such rows$"


def good_line(index: int) -> bytes:
    return json.dumps({"problem": f"{index} + 1 = ?", "answer": str(index + 1)}).encode()


def hostile_file(tmp_path, seed: int):
    """A JSONL file of 30 good rows, every bad line once and a repeated id, mixed with blank lines, at seeded random
    positions, with a BOM, LF and CRLF line ends mixed. Returns (path, good rows' (line, index), bad (line, regex))."""
    rng = random.Random(seed)
    items = [("good", i) for i in range(30)] + [("bad", name) for name in BAD_LINES]
    items += [("blank", b""), ("blank", b"   "), ("blank", b"\t")]
    rng.shuffle(items)
    # A repeated id: the second use is the bad row, wherever the two land.
    first, second = sorted(rng.sample(range(len(items) + 1), 2))
    items.insert(first, ("id", "first"))
    items.insert(second + 1, ("id", "second"))
    lines, good, bad, first_id_line = [], [], [], None
    for number, (kind, what) in enumerate(items, start=1):
        if kind == "good":
            lines.append(good_line(what))
            good.append((number, what))
        elif kind == "bad":
            lines.append(BAD_LINES[what][0])
            bad.append((number, BAD_LINES[what][1]))
        elif kind == "blank":
            lines.append(what)
        elif what == "first":
            lines.append(b'{"id": "dup", "problem": "7 + 1 = ?", "answer": "8"}')
            good.append((number, "dup"))
            first_id_line = number
        else:
            lines.append(b'{"id": "dup", "problem": "7 + 2 = ?", "answer": "9"}')
            bad.append((number, None))  # the message names the first use: filled in below
    path = tmp_path / f"hostile-{seed}.jsonl"
    bad = [(n, regex or rf": id 'dup' is already the id of {re.escape(str(path))}:{first_id_line}; give each row its own id")
           for n, regex in bad]
    with path.open("wb") as handle:
        handle.write(BOM)  # as editors on Windows write it
        for line in lines:
            handle.write(line + rng.choice([b"\n", b"\r\n"]))
    return path, good, bad


@pytest.mark.parametrize("seed", range(4))
def test_every_bad_line_is_reported_with_file_line_and_fix_wherever_it_sits(tmp_path, seed):
    path, good, bad = hostile_file(tmp_path, seed)
    where = re.escape(str(path))

    # Without skip_bad_rows: the first bad line in the file stops the load, and says where, what and the fix.
    first_line, first_regex = bad[0]
    with pytest.raises(BadRowError) as caught:
        build_prompts(DataConfig(source="jsonl", path=str(path)))
    assert re.fullmatch(f"{where}:{first_line}{first_regex}.*{SKIP_HINT}", str(caught.value)), str(caught.value)

    # With it: every bad line is skipped and counted, with its own message, in file order; the good rows all load.
    prompts, skipped = load_problems(DataConfig(source="jsonl", path=str(path), skip_bad_rows=True))
    assert len(skipped) == len(bad) == len(BAD_LINES) + 1
    for message, (line, regex) in zip(skipped, bad):
        assert re.fullmatch(f"{where}:{line}{regex}.*", message), (line, message)
    expected_ids = [f"hostile-{seed}-{line}" if index != "dup" else "dup" for line, index in good]
    assert [p.prompt_id for p in prompts] == expected_ids
    assert [p.answer for p in prompts] == ["8" if index == "dup" else str(index + 1) for _, index in good]
    assert all("\r" not in p.question and "\ufeff" not in p.question for p in prompts)


def test_a_line_that_is_not_utf8_is_a_bad_row_not_a_crash(tmp_path):
    # Before issue 13 the file was read in text mode: UnicodeDecodeError, no file or line, even with skip_bad_rows.
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n{"problem": "caf\xe9?", "answer": "1"}\n'
                     b'{"problem": "2+2?", "answer": "4"}\n')
    with pytest.raises(BadRowError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at byte 17 of the line\)"):
        load_problems(DataConfig(source="jsonl", path=str(path)))
    prompts, skipped = load_problems(DataConfig(source="jsonl", path=str(path), skip_bad_rows=True))
    assert [p.answer for p in prompts] == ["2", "4"] and len(skipped) == 1


def test_bom_crlf_blank_lines_and_a_missing_last_line_end_are_accepted_silently(tmp_path, caplog):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(BOM + good_line(0) + b"\r\n\r\n  \r\n" + BOM + good_line(1) + b"\r\n" + good_line(2))
    prompts, skipped = load_problems(DataConfig(source="jsonl", path=str(path)))
    assert [p.prompt_id for p in prompts] == ["windows-1", "windows-4", "windows-5"] and skipped == []
    assert [p.question for p in prompts] == ["0 + 1 = ?", "1 + 1 = ?", "2 + 1 = ?"]
    assert not caplog.records


def test_a_utf16_file_is_refused_whole_with_the_fix(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes('{"problem": "1+1?", "answer": "2"}\n'.encode("utf-16"))
    with pytest.raises(ValueError, match=r"utf16\.jsonl is UTF-16 .*; save it as UTF-8"):
        load_problems(DataConfig(source="jsonl", path=str(path), skip_bad_rows=True))


def test_cr_only_line_ends_are_named(tmp_path):
    path = tmp_path / "mac.jsonl"
    path.write_bytes(good_line(0) + b"\r" + good_line(1) + b"\r")
    with pytest.raises(BadRowError, match=r"mac\.jsonl:1:\d+: invalid JSON \(Extra data\); the file seems to use CR "
                                          r"line ends \(old Mac\): convert them to LF"):
        load_problems(DataConfig(source="jsonl", path=str(path)))


def test_a_long_line_without_a_line_end_is_skipped_and_the_limit_is_a_setting(tmp_path):
    path = tmp_path / "long.jsonl"
    long_row = b'{"problem": "' + b"1" * 3000 + b'", "answer": "1"}'
    path.write_bytes(good_line(0) + b"\n" + long_row)  # the last line, no line end
    prompts, skipped = load_problems(DataConfig(source="jsonl", path=str(path), skip_bad_rows=True, max_row_bytes=1000))
    assert len(prompts) == 1 and len(skipped) == 1
    assert re.search(r"long\.jsonl:2: the line is 3030 bytes, over data\.max_row_bytes \(1000 bytes\)", skipped[0])
    prompts, skipped = load_problems(DataConfig(source="jsonl", path=str(path), max_row_bytes=4000))
    assert len(prompts) == 2 and not skipped


def test_only_the_first_size_usable_rows_are_read(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"\n".join(good_line(i) for i in range(5)) + b"\n\xff\xfe broken\n")
    prompts, skipped = load_problems(DataConfig(source="jsonl", path=str(path), size=5))
    assert len(prompts) == 5 and not skipped  # the broken line after them is never reached


def test_a_file_of_only_bad_rows_says_so(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"junk\n[1]\n")
    with pytest.raises(ValueError, match=r"junk\.jsonl holds no usable rows \(2 skipped\)"):
        load_problems(DataConfig(source="jsonl", path=str(path), skip_bad_rows=True))
