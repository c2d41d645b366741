import json

import pytest
import torch
from safetensors.torch import save_file

from sinkquant.errors import InputError
from sinkquant.stream.source import INDEX, SafetensorsSource


def _sharded(folder):
    save_file(
        {"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.zeros(3)}, str(folder / "one.safetensors")
    )
    save_file({"c": torch.arange(4)}, str(folder / "two.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {"a": "one.safetensors", "b": "one.safetensors", "c": "two.safetensors"},
    }
    (folder / INDEX).write_text(json.dumps(index))


def test_reads_only_what_is_asked_through_the_index(tmp_path):
    _sharded(tmp_path)
    source = SafetensorsSource(tmp_path)
    assert sorted(source.names()) == ["a", "b", "c"]
    assert source.dtype_of("a") == torch.bfloat16 and source.shape_of("c") == (4,)
    got = source.read(["c", "a"])
    assert set(got) == {"a", "c"} and torch.equal(got["c"], torch.arange(4))
    assert source.float_dtype() == torch.float32  # 12 bytes of float32 against 4 of bf16


def test_a_shard_the_index_names_but_the_folder_lacks_is_refused(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "two.safetensors").unlink()
    with pytest.raises(InputError, match="two.safetensors is listed"):
        SafetensorsSource(tmp_path)


def test_a_truncated_file_is_named(tmp_path):
    save_file({"a": torch.ones(100)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:40])
    with pytest.raises(InputError, match="model.safetensors is not a readable safetensors file"):
        SafetensorsSource(tmp_path)
