import json
import time

import pytest
import torch

from sinkquant.data import (
    adds_bos,
    calibration_samples,
    embedded_calibration_path,
    load_documents,
    normalize_text,
)
from sinkquant.errors import InputError


def test_normalize_text_turns_crlf_and_cr_into_lf():
    assert normalize_text("a\r\nb\rc\n") == "a\nb\nc\n"


def test_text_file_is_one_document_with_normalised_line_ends(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"first line\r\nsecond line\r\n")
    assert load_documents(path) == ["first line\nsecond line\n"]


def test_jsonl_and_parquet_give_one_document_per_row(tmp_path):
    rows = [{"text": "alpha beta"}, {"text": "gamma"}, {"text": "  "}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_documents(jsonl) == ["alpha beta", "gamma"]
    import datasets

    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    assert load_documents(parquet) == ["alpha beta", "gamma"]


def test_embedded_slice_is_small_and_loads():
    path = embedded_calibration_path()
    assert path.stat().st_size <= 1_500_000  # a wheel-sized slice, not a dataset
    docs = load_documents(None)
    assert len(docs) == 512
    # the GPTQ recipes draw 128 x 512 tokens; at about 4 characters a token that needs 262k characters,
    # and twice that leaves room for tokenizers with larger vocabularies
    assert sum(len(d) for d in docs) >= 2 * 4 * 128 * 512


def test_missing_file_empty_file_and_wrong_field_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_documents(tmp_path / "nope.jsonl")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(InputError, match="empty"):
        load_documents(tmp_path / "e.txt")
    (tmp_path / "f.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match="no 'text' field"):
        load_documents(tmp_path / "f.jsonl")


def test_hub_name_fails_at_once_when_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(InputError, match="offline"):
        load_documents("wikitext2")
    assert time.perf_counter() - start < 5


def test_calibration_samples_are_deterministic_and_seeded(stories):
    _, tok = stories
    a = calibration_samples(tok, None, 4, 64, seed=3)
    b = calibration_samples(tok, None, 4, 64, seed=3)
    c = calibration_samples(tok, None, 4, 64, seed=4)
    assert a.input_ids.shape == (4, 64)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    # stories260k's tokenizer adds BOS: every sample starts with it
    assert adds_bos(tok) and bool((a.input_ids[:, 0] == tok.bos_token_id).all())


def test_too_little_text_for_the_samples_is_an_input_error(stories, tmp_path):
    _, tok = stories
    path = tmp_path / "short.txt"
    path.write_text("once upon a time")
    with pytest.raises(InputError, match="fewer than"):
        calibration_samples(tok, path, 2, 128)


def test_a_network_failure_is_a_failed_step_not_bad_input(monkeypatch):
    """No connection to the hub is exit 1 (the step failed), naming the hub and the ways around it."""
    import socket

    from sinkquant import data
    from sinkquant.errors import SinkQuantError

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(
        SinkQuantError, match=r"huggingface.co: Connection refused.*HF_HUB_OFFLINE=1"
    ) as caught:
        data.load_documents("c4")
    assert not isinstance(caught.value, InputError) and caught.value.exit_code == 1

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: __import__("contextlib").nullcontext())

    def timeout(*args, **kwargs):
        raise RuntimeError("builder failed") from TimeoutError("read timed out")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", timeout)
    with pytest.raises(SinkQuantError, match="read timed out") as caught:
        data.load_documents("c4")
    assert caught.value.exit_code == 1
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("no such dataset"))
    )
    with pytest.raises(InputError, match="could not be loaded from the hub"):
        data.load_documents("c4")
