import pytest
import torch

from sinkquant.stream.store import HiddenStore, memory_limit_bytes


def test_entries_past_the_budget_live_on_disk_and_read_back_exactly():
    values = [torch.randn(2, 8, 4) for _ in range(5)]
    with HiddenStore(values, budget=2 * values[0].numel() * 4) as store:
        assert store.spilled == 3 and store.spill_dir is not None
        assert all(torch.equal(a, b) for a, b in zip(values, store, strict=True))
        store[4] = values[0] * 2
        assert torch.equal(store[4], values[0] * 2)
        folder = store.spill_dir
    assert not folder.exists()


def test_the_spill_folder_goes_away_on_an_error():
    with pytest.raises(RuntimeError), HiddenStore([torch.ones(4)], budget=0) as store:
        folder = store.spill_dir
        assert folder.exists()
        raise RuntimeError("interrupted")
    assert not folder.exists()


def test_the_memory_limit_is_positive():
    assert memory_limit_bytes() > 1 << 20
