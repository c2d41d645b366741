import json

import torch
from safetensors.torch import load_file

from sinkquant.stream.source import INDEX, SafetensorsSource
from sinkquant.stream.writer import ShardWriter


def test_shards_are_named_and_indexed_as_transformers_writes_them(tmp_path):
    writer = ShardWriter(tmp_path, shard_bytes=64)
    tensors = {f"t{i}": torch.full((8,), float(i)) for i in range(5)}  # 32 bytes each: two per shard
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.finish()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 5 * 32 and len(index["weight_map"]) == 5
    source = SafetensorsSource(tmp_path)
    assert all(torch.equal(source.read([n])[n], t) for n, t in tensors.items())
    assert not list(tmp_path.glob(".shard-*"))


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    writer = ShardWriter(tmp_path)
    base = torch.arange(100.0)
    writer.add("view", base[:3])  # a view is stored alone, not with its whole storage
    assert writer.finish() == ["model.safetensors"] and not (tmp_path / INDEX).exists()
    assert load_file(str(tmp_path / "model.safetensors"))["view"].tolist() == [0.0, 1.0, 2.0]
    assert (tmp_path / "model.safetensors").stat().st_size < 200
