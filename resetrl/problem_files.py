"""User problems: JSONL and parquet files, and Hugging Face datasets (data.source = jsonl | parquet | hf).

Every row becomes a PromptRecord through one column mapping (data.question_key, answer_key, solution_key; a
`steps` list column and an `id` column are used when present; the other columns ride along as metadata) and one
answer convention (data.answer_format):
- plain: the answer column as it is;
- gsm8k: the answer column is a worked solution ending in `#### N`: N is the answer, the lines above the steps;
- math_boxed: the answer is the last `\\boxed{}` of the solution column, whose lines (or sentences) are the steps;
- auto, decided per row: gsm8k when the answer column has a `####` line, plain when it holds anything else,
  math_boxed when it is missing or empty and the solution has a `\\boxed{}`.

Hostile files. A malformed row, wherever it sits, stops the load with `WHERE: what is wrong; the fix`, WHERE being
FILE:LINE[:COL] for JSONL, FILE:ROW for parquet and DATASET[SPLIT]:ROW for a dataset (rows from 1); with
data.skip_bad_rows it is skipped, logged and counted instead. A JSONL file is read as bytes and each line is
decoded on its own, so a bad byte costs one row, never the file, and a line longer than data.max_row_bytes is
skipped over without being held in memory. Accepted silently because real files have them: a UTF-8 byte-order
mark at the start of a line (the first, or where files were concatenated), CRLF line ends, and blank or
whitespace-only lines (skipped, not counted: they hold no row). A UTF-16 file is refused whole. An id used twice
is a bad row (the second use): prompt ids must be unique for the run's exactly-once accounting.

JSONL files are read here, not by `datasets.load_dataset("json")`, also under data.source=hf: that builder infers
one arrow schema for the whole file, so one bad line fails the file without a line number, and a column mixing
"5" and 5 is silently cast.
"""

from __future__ import annotations

import glob
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resetrl.hub import datasets_cache_dir, hub_cache_dir, hub_offline, parse_hub_id, snapshot
from resetrl.record import PromptRecord, msgpack_safe
from resetrl.solutions import gsm_final_answer, last_boxed, solution_steps

if TYPE_CHECKING:  # annotations only: the config imports the methods, which import resetrl.data
    from resetrl.config import DataConfig

log = logging.getLogger(__name__)

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

# A row source yields (where, row or the BadRowError of a row that could not be read, fallback prompt id).
Rows = Iterator[tuple[str, Any, str]]


class BadRowError(ValueError):
    """A row that cannot become a prompt; the message names where it is, what is wrong and the fix."""


def load_problems(cfg: DataConfig) -> tuple[list[PromptRecord], list[str]]:
    """The first cfg.size usable problems of cfg.path (source jsonl, parquet or hf), and the messages of the rows
    skipped on the way (data.skip_bad_rows; without it the first bad row raises BadRowError)."""
    rows, task = _rows(cfg)
    prompts: list[PromptRecord] = []
    skipped: list[str] = []
    first_use: dict[str, str] = {}
    for where, row, fallback_id in rows:
        try:
            if isinstance(row, BadRowError):
                raise row
            prompt = row_prompt(where, row, cfg, fallback_id, task)
            if prompt.prompt_id in first_use:
                first = first_use[prompt.prompt_id]
                raise BadRowError(f"{where}: id {prompt.prompt_id!r} is already the id of {first}; give each row "
                                  "its own id")
        except BadRowError as exc:
            if not cfg.skip_bad_rows:
                raise BadRowError(f"{exc}; or set data.skip_bad_rows=true to skip and count such rows") from None
            log.warning("skipping %s", exc)
            skipped.append(str(exc))
            continue
        first_use[prompt.prompt_id] = where
        prompts.append(prompt)
        if len(prompts) == cfg.size:
            break
    if not prompts:
        raise ValueError(f"data.path: {cfg.path} holds no usable rows ({len(skipped)} skipped)")
    return prompts, skipped


def _rows(cfg: DataConfig) -> tuple[Rows, str]:
    """The row source for cfg and the task name its prompts get."""
    path = Path(cfg.path).expanduser()
    if cfg.source == "jsonl" or (cfg.source == "hf" and _is_json_lines(path)):
        _must_be_a_file(path)
        return _jsonl_rows(path, cfg.max_row_bytes), path.stem
    if cfg.source == "parquet":
        _must_be_a_file(path)
        return _parquet_rows(path), path.stem
    dataset, name = _open_dataset(cfg)
    label = f"{cfg.path}[{cfg.split}]"
    split = cfg.split.split("[")[0]
    rows = ((f"{label}:{number}", row, f"{name}-{split}-{number}") for number, row in enumerate(dataset, start=1))
    return rows, name


def _must_be_a_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"data.path: {path} does not exist" + (" as a file" if path.exists() else ""))


# ---- JSONL ------------------------------------------------------------------------------------------------------

def _is_json_lines(path: Path) -> bool:
    """A .jsonl file, or a .json file whose first line is a whole object (JSON Lines under another name)."""
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        return False
    if path.suffix == ".jsonl":
        return True
    with path.open("rb") as handle:
        first = handle.readline(1 << 20).strip().removeprefix(_UTF8_BOM)
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        return False


def _jsonl_rows(path: Path, max_row_bytes: int) -> Rows:
    with path.open("rb") as handle:
        if handle.read(2) in _UTF16_BOMS:
            raise ValueError(f"data.path: {path} is UTF-16 (it starts with a UTF-16 byte-order mark); save it as "
                             "UTF-8, one JSON object per line")
        handle.seek(0)
        number = 0
        # +2: room for the line end ("\r\n") of a line of exactly max_row_bytes.
        while raw := handle.readline(max_row_bytes + 2):
            number += 1
            where = f"{path}:{number}"
            complete = raw.endswith(b"\n")
            line = raw.removesuffix(b"\n").removesuffix(b"\r")
            if len(line) > max_row_bytes:
                size = len(line) + (0 if complete else _skip_rest_of_line(handle))
                yield where, _too_long(where, size, max_row_bytes, b"\r" in line), ""
                continue
            line = line.removeprefix(_UTF8_BOM)
            if not line.strip():
                continue
            yield where, _parse_json_line(where, line), f"{path.stem}-{number}"


def _skip_rest_of_line(handle) -> int:
    """Read past the end of the current line in 1 MiB pieces (never the whole line at once); bytes skipped."""
    skipped = 0
    while piece := handle.readline(1 << 20):
        if piece.endswith(b"\n"):
            return skipped + len(piece) - 1
        skipped += len(piece)
    return skipped


def _too_long(where: str, size: int, limit: int, has_cr: bool) -> BadRowError:
    cause = ("the file seems to use CR line ends (old Mac): convert them to LF" if has_cr else
             "a row that long is usually many rows whose line ends were lost: fix the line ends")
    return BadRowError(f"{where}: the line is {_size(size)}, over data.max_row_bytes ({_size(limit)}); {cause}, or "
                       "raise data.max_row_bytes")


def _parse_json_line(where: str, line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRowError(
            f"{where}: not UTF-8 (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line); save the file "
            "as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 FILE > NEW), or fix that byte"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRowError(f"{where}:{exc.colno}: invalid JSON ({exc.msg}); {_json_fix(text, exc)}")
    except RecursionError:
        return BadRowError(f"{where}: the JSON is nested too deeply to read; a row is one object of plain columns")


def _json_fix(text: str, exc: json.JSONDecodeError) -> str:
    if text[exc.pos : exc.pos + 1] == "\ufeff":
        return "a byte-order mark sits inside the line, where two files were joined without a line end: add one"
    if exc.msg == "Extra data":
        if "\r" in text[: exc.pos]:
            return "the file seems to use CR line ends (old Mac): convert them to LF"
        return "the line holds more than one JSON value: put one object per line"
    if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
        return ("the line ends before its JSON does: it was cut off, or one object spans several lines; put each "
                "row's whole object on one line")
    return 'each line must be one JSON object, e.g. {"problem": "2+3?", "answer": "5"}'


def _size(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB" if count >= 1 << 20 else f"{count} bytes"


# ---- parquet ----------------------------------------------------------------------------------------------------

def _parquet_rows(path: Path) -> Rows:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError("data.source=parquet needs pyarrow: pip install pyarrow") from exc
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:{number}", row, f"{path.stem}-{number}"
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"data.path: {path} is not a readable parquet file ({exc}); write it again with "
                         "pyarrow / pandas .to_parquet, or use data.source=jsonl") from exc


# ---- Hugging Face datasets --------------------------------------------------------------------------------------

def _open_dataset(cfg: DataConfig):
    """(the datasets.Dataset of cfg.split, a short name for prompt ids and the task) for data.source=hf."""
    try:
        import datasets
    except ImportError as exc:
        raise ValueError("data.source=hf needs the `datasets` package: pip install datasets (make install does "
                         "it)") from exc
    target = Path(cfg.path).expanduser()
    cache = str(datasets_cache_dir())
    try:
        if target.is_dir() and ((target / "dataset_dict.json").is_file() or (target / "state.json").is_file()):
            return _saved_split(datasets.load_from_disk(str(target)), cfg), target.name
        if target.exists() or glob.has_magic(cfg.path):
            return _data_files(datasets, target, cfg, cache), target.stem
        if cfg.path.startswith(("/", ".", "~")) or target.suffix in _DATA_FILE_BUILDERS:
            raise ValueError(f"data.path: {target} does not exist")
        return _hub_dataset(datasets, cfg, cache), cfg.path.rsplit("/", 1)[-1]
    except ValueError as exc:  # ours pass through; datasets' own words get the field and, if it is one, the hint
        if str(exc).startswith("data."):
            raise
        about_split = any(word in str(exc).lower() for word in ("config", "split", "instruction"))
        hint = "; check data.config_name and data.split" if about_split else ""
        raise ValueError(f"data.path: {cfg.path}: {exc}{hint}") from exc
    except datasets.exceptions.DatasetGenerationError as exc:
        raise ValueError(f"data.path: datasets could not read {cfg.path} ({exc.__cause__ or exc}); fix the files, "
                         "or use data.source=jsonl for per-line errors") from exc
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and str(exc).startswith("data.path"):
            raise
        raise ValueError(f"data.path: {cfg.path}: {exc}") from exc


def _saved_split(loaded, cfg: DataConfig):
    """A save_to_disk folder holds one Dataset, or a DatasetDict of splits."""
    if not hasattr(loaded, "keys"):
        return loaded
    if cfg.split not in loaded:
        raise ValueError(f"data.split: {cfg.path} has no split {cfg.split!r}; it has {', '.join(map(repr, loaded))}")
    return loaded[cfg.split]


def _data_files(datasets, target: Path, cfg: DataConfig, cache: str):
    if target.is_dir():  # a folder of data files, e.g. a hub repo's snapshot: datasets reads its layout and README
        return datasets.load_dataset(str(target), name=cfg.config_name, split=cfg.split, cache_dir=cache)
    if cfg.config_name is not None:
        raise ValueError(f"data.config_name: {cfg.path} is a data file, which has no configurations; remove "
                         "data.config_name (it names a configuration of a hub dataset or a dataset folder)")
    if not target.exists() and not glob.glob(str(target)):
        raise ValueError(f"data.path: {cfg.path} matches no files")
    suffix = Path(cfg.path).suffix
    if suffix not in _DATA_FILE_BUILDERS:
        raise ValueError(f"data.path: {cfg.path}: data files must end in {', '.join(_DATA_FILE_BUILDERS)}")
    files = {cfg.split.split("[")[0]: str(target)}
    return datasets.load_dataset(_DATA_FILE_BUILDERS[suffix], data_files=files, split=cfg.split, cache_dir=cache)


def _hub_dataset(datasets, cfg: DataConfig, cache: str):
    """A hub dataset id: the snapshot in the hub cache when offline, else through the datasets cache / download."""
    hub_id = parse_hub_id(cfg.path)
    if hub_id is None or hub_id[1] is not None:
        raise ValueError(f"data.path: {cfg.path} is not a local file or folder, nor a hub dataset id (org/name)")
    if hub_offline():
        try:
            folder = snapshot(hub_id[0], repo_type="dataset", field="data.path")
        except FileNotFoundError:
            folder = None  # perhaps an earlier online load_dataset left it in the datasets cache
        if folder is not None:
            return datasets.load_dataset(str(folder), name=cfg.config_name, split=cfg.split, cache_dir=cache)
    try:
        return datasets.load_dataset(cfg.path, name=cfg.config_name, split=cfg.split, cache_dir=cache)
    except ConnectionError as exc:
        state = ("HF_HUB_OFFLINE is set, so nothing is downloaded" if hub_offline() else
                 f"the hub could not be reached ({exc})")
        raise ValueError(
            f"data.path = {cfg.path!r}: no local file or folder has that name, and the hub dataset is in neither the "
            f"Hugging Face cache {hub_cache_dir()} nor the datasets cache {cache}; {state}. Fix: download it once "
            f"where the hub is reachable, into the same HF_HOME (e.g. `hf download {cfg.path} --repo-type dataset`), "
            "or set data.path to local files"
        ) from exc


# ---- a row becomes a prompt -------------------------------------------------------------------------------------

def row_prompt(where: str, row: Any, cfg: DataConfig, fallback_id: str, task: str) -> PromptRecord:
    """The prompt of one row (module docstring: column mapping and answer_format); BadRowError says what is wrong."""
    if not isinstance(row, dict):
        raise BadRowError(f"{where}: a row must be an object with the problem and its answer, got "
                          f"{type(row).__name__} {_preview(row)}")
    question_key = cfg.question_key or ("problem" if "problem" in row or "question" not in row else "question")
    question = _text(where, row, question_key, required=True, hint=f"set data.question_key to the column holding the "
                     f"problem (this row has columns {_preview(list(row))})")
    answer, steps = _answer_and_steps(where, row, cfg)
    if (listed := row.get("steps")) is not None:
        if not isinstance(listed, list) or not listed or not all(isinstance(s, str) and s.strip() for s in listed):
            raise BadRowError(f"{where}: column 'steps' must be a non-empty list of non-empty strings, got "
                              f"{_preview(listed)}")
        steps = [step.strip() for step in listed]
    used = {question_key, cfg.answer_key, cfg.solution_key, "steps", "id"}
    metadata = msgpack_safe({key: value for key, value in row.items() if key not in used})
    if steps:
        metadata["expert_steps"] = steps
    prompt_id = fallback_id if row.get("id") is None else _text(where, row, "id", required=True)
    return PromptRecord(prompt_id=prompt_id, question=question, answer=answer, task=task, metadata=metadata)


def _answer_and_steps(where: str, row: dict, cfg: DataConfig) -> tuple[str, list[str]]:
    answer_text = _text(where, row, cfg.answer_key, required=False)
    solution = _text(where, row, cfg.solution_key, required=False)
    style = cfg.answer_format
    if style == "auto":
        if answer_text is not None:
            style = "gsm8k" if gsm_final_answer(answer_text) is not None else "plain"
        elif solution is not None and last_boxed(solution) is not None:
            style = "math_boxed"
        else:
            raise BadRowError(f"{where}: column '{cfg.answer_key}' missing or empty"
                              + (f" and column '{cfg.solution_key}' has no \\boxed{{}} answer" if solution else "")
                              + "; give the row an answer, or set data.answer_key to the column that holds it")
    steps = solution_steps(solution) if solution is not None else []
    if style == "math_boxed":
        if solution is None:
            raise BadRowError(f"{where}: column '{cfg.solution_key}' missing (data.answer_format=math_boxed takes the "
                              "answer from its last \\boxed{}); set data.solution_key to the worked-solution column")
        boxed = last_boxed(solution)
        if not boxed:
            raise BadRowError(f"{where}: column '{cfg.solution_key}' has no \\boxed{{...}} answer (or its braces do "
                              "not close); fix the solution, or use data.answer_format=plain with an answer column")
        return boxed, steps
    if answer_text is None:
        raise BadRowError(f"{where}: column '{cfg.answer_key}' missing or empty; give the row an answer, or set "
                          "data.answer_key to the column that holds it")
    if style == "gsm8k":
        final = gsm_final_answer(answer_text)
        if not final:
            raise BadRowError(f"{where}: column '{cfg.answer_key}' has no '#### <answer>' line (data.answer_format="
                              "gsm8k); fix the row, or use data.answer_format=plain")
        return final, steps or solution_steps(answer_text)
    return answer_text, steps


def _text(where: str, row: dict, name: str, required: bool, hint: str = "fix the row") -> str | None:
    """A column as non-empty text (numbers are written as text); None when it is absent (or, not required, empty)."""
    value = row.get(name)
    if value is None or (not required and isinstance(value, str) and not value.strip()):
        if required:
            raise BadRowError(f"{where}: column '{name}' missing; {hint}")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRowError(f"{where}: column '{name}' must be a non-empty string, got {type(value).__name__} "
                          f"{_preview(value)}; fix the row")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRowError(f"{where}: column '{name}' is {value}; it must be text or a finite number")
    text = str(value).strip()
    if not text:
        raise BadRowError(f"{where}: column '{name}' must be a non-empty string, got {value!r}; fix the row")
    return text


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
