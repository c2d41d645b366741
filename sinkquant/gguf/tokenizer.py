"""Tokenizer metadata for GGUF from an HF tokenizer folder: GPT-2 style byte-level BPE (`tokenizer.json`)
or SentencePiece (`tokenizer.model`, read here without the sentencepiece package)."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf

from ..errors import InputError

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _is_gpt2(steps: list[dict[str, Any]]) -> bool:
    return [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True)


def _is_smollm(steps: list[dict[str, Any]]) -> bool:
    return (
        [s.get("type") for s in steps] == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits", False)
        and steps[1].get("use_regex", True)
    )


def _is_qwen2(steps: list[dict[str, Any]]) -> bool:
    return (
        [s.get("type") for s in steps] == ["Split", "ByteLevel"]
        and steps[0].get("pattern", {}).get("Regex") == QWEN2_PATTERN
        and not steps[1].get("use_regex", True)
    )


#: llama.cpp's pre-tokenizer names (llama-vocab.cpp) by the HF pre-tokenizer that splits text the same
#: way; llama.cpp itself tells them apart by hashing a tokenized probe text, which needs the real vocab
PRE_TOKENIZERS: dict[str, Callable[[list[dict[str, Any]]], bool]] = {
    "gpt-2": _is_gpt2,
    "smollm": _is_smollm,
    "qwen2": _is_qwen2,
}


def _pre_name(tokenizer: dict[str, Any], folder: Path) -> str:
    steps = _steps(tokenizer.get("pre_tokenizer"))
    for name, matches in PRE_TOKENIZERS.items():
        if matches(steps):
            return name
    raise InputError(
        f"{folder}: the byte-level BPE tokenizer splits text in a way llama.cpp's GGUF export here does "
        f"not know (known: {', '.join(PRE_TOKENIZERS)}): use llama.cpp's convert_hf_to_gguf.py"
    )


def _padded(tokens: dict[int, tuple[str, float, int]], n_vocab: int, folder: Path) -> list:
    """Tokens by id, holes and the rows past the tokenizer's vocabulary filled with unused `[PADn]`
    tokens: llama.cpp needs one token per embedding row."""
    if tokens and max(tokens) >= n_vocab:
        raise InputError(
            f"{folder}: the tokenizer has ids up to {max(tokens)} but the model only {n_vocab} embedding "
            "rows: the tokenizer belongs to another model"
        )
    unused = int(gguf.TokenType.UNUSED)
    return [tokens.get(i, (f"[PAD{i}]", -1000.0, unused)) for i in range(n_vocab)]


def _bpe_tokens(tokenizer: dict[str, Any]) -> dict[int, tuple[str, float, int]]:
    tokens = {i: (text, 0.0, int(gguf.TokenType.NORMAL)) for text, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[int(added["id"])] = (added["content"], 0.0, int(kind))
    return tokens


def _fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(buf):
        key = varint()
        wire = key & 7
        width = {1: 8, 5: 4}.get(wire)
        if wire == 0:
            yield key >> 3, varint()
            continue
        if wire == 2:
            width = varint()
        if width is None:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, buf[pos : pos + width]
        pos += width


def sentencepiece_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a SentencePiece `tokenizer.model`, in id order. Its piece types (normal 1,
    unknown 2, control 3, user defined 4, unused 5, byte 6) are gguf.TokenType's numbers."""
    pieces = []
    for number, value in _fields(path.read_bytes()):
        if number != 1:  # ModelProto.pieces; trainer and normalizer specs are not needed
            continue
        piece = {1: b"", 2: b"\0\0\0\0", 3: 1} | dict(_fields(value))
        pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], int(piece[3])))
    return pieces


def _adds_space_prefix(tokenizer: dict[str, Any]) -> bool:
    normalizer = tokenizer.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer])
    prepends = any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in steps)
    metaspace = any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
                    for s in _steps(tokenizer.get("pre_tokenizer")))  # fmt: skip
    return prepends or metaspace


def _write_tokens(writer: gguf.GGUFWriter, tokens: list[tuple[str, float, int]], scores: bool) -> None:
    writer.add_token_list([text for text, _, _ in tokens])
    if scores:
        writer.add_token_scores([score for _, score, _ in tokens])
    writer.add_token_types([kind for _, _, kind in tokens])


@contextmanager
def _quiet_vocab():
    """gguf.SpecialVocab logs warnings about parts of tokenizer.json llama.cpp does not use (a pair
    template's separator); the CLI keeps stderr for errors and its own warnings."""
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _special_vocab(writer: gguf.GGUFWriter, folder: Path, n_vocab: int, merges: bool) -> None:
    """bos/eos/unk/pad ids, the add_bos/add_eos flags, the chat template and (BPE) the merges."""
    with _quiet_vocab():
        gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, n_vocab: int) -> str:
    """Write the `tokenizer.ggml.*` keys for the tokenizer in `folder`; returns the tokenizer model
    name ("gpt2" or "llama")."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{folder} has no tokenizer.json: save the model's tokenizer into it")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    byte_level = any(s.get("type") == "ByteLevel" for s in _steps(tokenizer.get("pre_tokenizer")))
    if model.get("type") == "BPE" and byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(tokenizer, folder))
        _write_tokens(writer, _padded(_bpe_tokens(tokenizer), n_vocab, folder), scores=False)
        _special_vocab(writer, folder, n_vocab, merges=True)
        return "gpt2"
    spm = folder / "tokenizer.model"
    if not spm.is_file():
        raise InputError(
            f"{folder}: a SentencePiece tokenizer needs its tokenizer.model (the token scores llama.cpp "
            "merges by): copy it from the original model's folder"
        )
    writer.add_tokenizer_model("llama")  # llama.cpp's SentencePiece tokenizer reads no pre-tokenizer name
    pieces = dict(enumerate(sentencepiece_pieces(spm)))
    for added in tokenizer.get("added_tokens", []):  # tokens added on top of the SentencePiece model
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        pieces.setdefault(int(added["id"]), (added["content"], -1000.0, int(kind)))
    _write_tokens(writer, _padded(pieces, n_vocab, folder), scores=True)
    writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    _special_vocab(writer, folder, n_vocab, merges=False)
    return "llama"
