"""Text for calibration and evaluation: local files or hub datasets, sampled deterministically.

Every source becomes a list of documents (strings). Local text and JSON files are read with the
standard library; parquet files and hub datasets go through `datasets` (the optional `data` extra: it
brings pyarrow and pandas, which a text file does not need and vLLM's environment, where sinkquant's
layers also run, does not have). Line ends are normalised to "\\n" before tokenizing (WikiText-2 ships
with CRLF). With no source, calibration uses the C4 slice embedded in the package.
"""

from __future__ import annotations

import json
import os
import random
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import InputError, SinkQuantError

#: Short names a user may type instead of a hub id, and where each lives on the hub.
HUB_DATASETS: dict[str, dict] = {
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test", "join": True},
    "c4": {
        "path": "allenai/c4",
        "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        "split": "validation",
        "join": False,
    },
}

EMBEDDED_CALIBRATION = "embedded:c4-512"
_LOCAL_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".raw": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def normalize_text(text: str) -> str:
    """Normalise line ends to "\\n" (CRLF and lone CR), the first step of the evaluation protocol."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def embedded_calibration_path() -> Path:
    """The 512 C4 validation documents shipped inside the package (see assets/ATTRIBUTION.md)."""
    return Path(str(resources.files("sinkquant") / "assets" / "c4_calibration_512.jsonl"))


HUB = "huggingface.co"


class HubUnreachable(SinkQuantError):
    """The hub could not be reached (timeout, refused connection): a failed step, not bad input."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(
            f"cannot reach the Hugging Face hub ({HUB}: {reason}) to fetch {what}; pass a local file or folder "
            "instead, or set HF_HUB_OFFLINE=1 to work offline"
        )


def hub_set_offline() -> bool:
    """True when the user told the libraries not to use the hub (HF_HUB_OFFLINE and its kin)."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_hub_reachable(what: str) -> None:
    """Raise `HubUnreachable` when the hub does not answer (a quick look rather than the hub client's
    long retry loop); `what` names the thing about to be fetched."""
    try:
        with socket.create_connection((HUB, 443), timeout=3):
            return
    except OSError as exc:
        raise HubUnreachable(what, exc.strerror or type(exc).__name__) from exc


def network_failure(exc: BaseException) -> str | None:
    """The reason, when `exc` (or an error it wraps) is a timeout or a failed connection."""
    for _ in range(16):
        names = {cls.__name__ for cls in type(exc).__mro__}
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)) or names & {
            "ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "ConnectError", "TimeoutException",
        }:  # fmt: skip
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        exc = exc.__cause__ or exc.__context__
        if exc is None:
            return None
    return None


def _datasets():
    """The `datasets` package, quietened, or a one-line error that says how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise InputError(
            "hub datasets and .parquet files are read with the `datasets` package, which is not installed; "
            "pip install 'sinkquant[data]', or give a .txt or .jsonl file"
        ) from exc
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


_EXPECTED = {
    "text": "plain text",
    "json": 'one JSON object like {"text": ...} per line',
    "parquet": "a parquet table with a text column",
}


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost error: the parser's own words, not the dataset builder's wrapper."""
    for _ in range(16):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unreadable(path: Path, builder: str, reason: str) -> InputError:
    return InputError(
        f"dataset {path} could not be read as {builder} ({reason.splitlines()[0]}); it should hold {_EXPECTED[builder]}"
    )


def _json_rows(path: Path) -> list:
    """The rows of a JSON-lines file, or of a .json file holding one array."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise _unreadable(path, "json", str(exc)) from None
        return rows if isinstance(rows, list) else [rows]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise _unreadable(path, "json", f"line {number}: {exc}") from None
    return rows


def _column(path: Path, rows: list, text_field: str) -> list:
    """`text_field` of every row, or a one-line error naming the fields the rows do have."""
    if any(not isinstance(row, dict) for row in rows):
        raise _unreadable(path, "json", "a row is not an object")
    _check_field(path, list(dict.fromkeys(key for row in rows for key in row)), text_field)
    return [row.get(text_field) for row in rows]


def _check_field(path: Path, fields: list[str], text_field: str) -> None:
    if text_field not in fields:
        raise InputError(
            f"dataset {path} has no {text_field!r} field (it has {', '.join(fields)}); "
            f"store each document's text under {text_field!r}"
        )


def _load_local(path: Path, text_field: str) -> list[str]:
    builder = _LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InputError(
            f'dataset {path} has an unknown format {path.suffix!r}; use a .txt, .jsonl (one {{"text": ...}} per line) '
            "or .parquet file, or a hub name (wikitext2, c4)"
        )
    if path.stat().st_size == 0:
        raise InputError(f"dataset {path} is empty; give a file with text in it")
    try:
        if builder == "text":  # the whole file is one document; text mode reads CRLF and CR as "\n"
            return [t for t in [path.read_text(encoding="utf-8")] if t.strip()]
        if builder == "json":
            texts = _column(path, _json_rows(path), text_field)
        else:
            table = _datasets().load_dataset("parquet", data_files=str(path), split="train")
            _check_field(path, table.column_names, text_field)
            texts = table[text_field]
    except (InputError, SinkQuantError):
        raise
    except Exception as exc:  # a parser's error for a malformed file: its own first line
        raise _unreadable(path, builder, _root_cause(exc)) from exc
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _load_hub(name: str, text_field: str) -> list[str]:
    spec = HUB_DATASETS.get(name, {"path": name, "split": "train", "join": False})
    if hub_set_offline():
        raise InputError(
            f"dataset {name!r} is a hub name but the Hugging Face hub is set offline (HF_HUB_OFFLINE or "
            "HF_DATASETS_OFFLINE); pass a local .txt/.jsonl/.parquet file instead"
        )
    check_hub_reachable(f"dataset {name!r}")
    datasets = _datasets()
    load_kwargs = {k: v for k, v in spec.items() if k in ("name", "data_files")}
    try:
        table = datasets.load_dataset(spec["path"], split=spec["split"], **load_kwargs)
    except Exception as exc:
        reason = network_failure(exc)
        if reason is not None:
            raise HubUnreachable(f"dataset {name!r}", reason) from exc
        raise InputError(
            f"dataset {name!r} could not be loaded from the hub: {str(exc).splitlines()[0]}"
        ) from exc
    texts = [t for t in table[text_field] if isinstance(t, str)]
    return ["".join(texts)] if spec["join"] else [t for t in texts if t.strip()]


def load_documents(dataset: str | os.PathLike | None, text_field: str = "text") -> list[str]:
    """Load a dataset as a list of non-empty documents with normalised line ends.

    `dataset` is a local file (.txt: the whole file is one document; .jsonl/.json/.parquet: one document
    per row, read from `text_field`), a hub name (`wikitext2`, `c4`, or any hub id), or None for the
    embedded C4 calibration slice.
    """
    if dataset is None or str(dataset) == EMBEDDED_CALIBRATION:
        docs = _load_local(embedded_calibration_path(), "text")
    else:
        path = Path(dataset).expanduser()
        looks_like_path = path.suffix.lower() in _LOCAL_BUILDERS or os.sep in str(dataset) or path.exists()
        if path.is_dir():
            raise InputError(f"dataset {path} is a folder; give a .txt, .jsonl or .parquet file")
        if path.exists():
            docs = _load_local(path, text_field)
        elif looks_like_path:
            raise InputError(f"dataset file {path} does not exist; check the path")
        else:
            docs = _load_hub(str(dataset), text_field)
    docs = [normalize_text(d) for d in docs]
    if not docs:
        raise InputError(f"dataset {dataset} holds no text")
    return docs


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts a BOS token in front of a fresh sequence (Llama-2 style).

    Such models saw BOS at position 0 in training; windows and calibration samples then start with BOS.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (the whole text at once, no length warning)."""
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e30)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved


@dataclass(frozen=True)
class CalibrationSamples:
    """`input_ids` [n_samples, seq_len] int64, and where they came from."""

    input_ids: torch.Tensor
    source: str
    seed: int
    bos: bool


def calibration_samples(
    tokenizer,
    dataset: str | os.PathLike | None,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
) -> CalibrationSamples:
    """Deterministic calibration samples: documents shuffled with `seed`, tokenized, joined with a blank
    line into one stream and cut into `n_samples` consecutive pieces of `seq_len` tokens (BOS first when
    the tokenizer adds one). The same tokenizer, data, sizes and seed always give the same tensor."""
    if n_samples < 1 or seq_len < 2:
        raise InputError(f"need at least 1 sample of at least 2 tokens (got {n_samples} x {seq_len})")
    docs = load_documents(dataset, text_field)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    bos = adds_bos(tokenizer)
    per_sample = seq_len - 1 if bos else seq_len
    needed = n_samples * per_sample
    separator = tokenize_text(tokenizer, "\n\n")
    stream: list[int] = []
    for i in order:
        if stream:
            stream.extend(separator)
        stream.extend(tokenize_text(tokenizer, docs[i]))
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        source = dataset or EMBEDDED_CALIBRATION
        raise InputError(
            f"dataset {source} has {len(stream)} tokens, fewer than {n_samples} samples x {per_sample} tokens need "
            f"({needed}); use fewer --samples, a shorter --seq-len or more text"
        )
    ids = torch.tensor(stream[:needed], dtype=torch.long).view(n_samples, per_sample)
    if bos:
        ids = torch.cat([torch.full((n_samples, 1), tokenizer.bos_token_id, dtype=torch.long), ids], dim=1)
    return CalibrationSamples(ids, str(dataset or EMBEDDED_CALIBRATION), seed, bos)
