import fcntl
import os
import re
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.file_baton import FileBaton

from sinkquant.kernels import best_isa, bind_layer, cpu, fused_kernels, int4_layout, int8_layout
from sinkquant.kernels.build import (
    CSRC,
    LOCK_NAME,
    build_name,
    cached_build,
    cflags,
    failure_marker,
    source_files,
)
from sinkquant.quantize.linear import SinkQuantLinear


def _fused_or_skip():
    if fused_kernels() is None:
        pytest.skip("the fused integer kernel cannot be built here (needs AVX2, a C++ compiler and ninja)")


@pytest.mark.parametrize("run, group, stride", [(16, 32, 32), (32, 32, 32), (16, 24, 32), (32, 24, 32)])
def test_fused_layout_holds_every_code_where_the_kernel_reads_it(run, group, stride):
    codes = torch.randint(0, 16, (5, 70), dtype=torch.uint8)  # the last group shorter
    bounds = [(start, min(start + group, 70)) for start in range(0, 70, group)]
    packed, got_stride = int4_layout(codes, group, run)
    assert got_stride == stride and packed.shape == (5, len(bounds) * stride // 2)
    runs = packed.view(5, -1, run // 2)
    unpacked = torch.cat([runs & 15, runs >> 4], dim=-1).reshape(5, len(bounds), stride)
    for g, (start, stop) in enumerate(bounds):
        assert torch.equal(unpacked[:, g, : stop - start], codes[:, start:stop])
        assert not unpacked[:, g, stop - start :].any()  # padding: zero codes


def test_int8_layout_pads_each_row_with_zero_codes():
    codes = torch.randint(-127, 128, (3, 37), dtype=torch.int8)
    for run, stride in ((16, 48), (32, 64)):
        packed, got_stride = int8_layout(codes, run)
        assert got_stride == stride and packed.dtype == torch.uint8 and packed.shape == (3, stride)
        assert torch.equal(packed.view(torch.int8)[:, :37], codes) and not packed[:, 37:].any()


def _buildable_isas():
    best = best_isa()
    return ["avx2", "avx512"] if best == "avx512" else ["avx2"]


@pytest.mark.parametrize("bits, group", [(4, 128), (4, 32), (4, 48), (8, None)])
def test_every_instruction_set_build_computes_the_same_layer(bits, group):
    """The AVX2 and AVX-512 builds (whichever this CPU runs) against the dequantized weights."""
    _fused_or_skip()
    torch.manual_seed(3)
    idx = torch.randperm(300)[:4]
    layer = SinkQuantLinear.from_float(torch.randn(70, 300), torch.randn(70), bits, group, idx)
    x = torch.randn(2, 300)
    x[:, idx] *= 30
    reference = F.linear(x.bfloat16().float(), layer.dequantized_weight(), layer.bias.float())
    for isa in _buildable_isas():
        bound = bind_layer(fused_kernels(isa), *layer._fused_numbers())
        y = bound(x.bfloat16().contiguous())
        assert float((y.float() - reference).abs().max() / reference.abs().max()) < 8e-3, isa
        y32 = bound(x.bfloat16().float().contiguous())  # float32 activations: no output rounding
        assert float((y32 - reference).abs().max() / reference.abs().max()) < 1e-5, isa


@pytest.mark.parametrize("group", [128, 48])
def test_every_instruction_set_build_reads_a_non_uniform_grid(group):
    """int4 codes indexing a layer's 16 levels: the decode product and the dense dequantization of both
    builds against the dequantized weight, and a bf16 layer's forward at decode and prefill sizes."""
    _fused_or_skip()
    torch.manual_seed(4)
    idx = torch.randperm(300)[:4]
    codes = torch.randint(0, 16, (70, 296), dtype=torch.uint8)
    groups = -(-296 // group)
    scale, minimum = (
        (torch.rand(70, groups) * 0.1 + 0.01).bfloat16(),
        (torch.randn(70, groups) * 0.3).bfloat16(),
    )
    levels = torch.cat([torch.zeros(1), torch.sort(torch.rand(14) * 15).values, torch.full((1,), 15.0)])
    layer = SinkQuantLinear.from_float(
        torch.randn(70, 300),
        torch.randn(70),
        4,
        group,
        idx,
        codes=codes,
        scale=scale,
        minimum=minimum,
        levels=levels,
    )
    weight = layer.dequantized_weight()
    x = torch.randn(2, 300)
    x[:, idx] *= 30
    reference = F.linear(x.bfloat16().float(), weight, layer.bias.float())
    dense = weight.clone()
    dense[:, idx] = 0
    for isa in _buildable_isas():
        bound = bind_layer(fused_kernels(isa), *layer._fused_numbers())
        y32 = bound(x.bfloat16().float().contiguous())
        assert float((y32 - reference).abs().max() / reference.abs().max()) < 1e-5, isa
        assert torch.allclose(bound.dequantized(False), dense, rtol=1e-6, atol=1e-7), isa  # FMA rounds once
    served = layer.to(torch.bfloat16)
    for rows in (x[:1], x.repeat(4, 1), x.repeat(40, 1)):  # decode, middle sizes (fused too), prefill (dense)
        want = F.linear(rows.bfloat16().float(), weight, layer.bias.float())
        got = served(rows.bfloat16()).float()
        assert float((got - want).abs().max() / want.abs().max()) < 2e-2


def test_switched_off_kernel_is_none_without_a_warning(monkeypatch):
    monkeypatch.setenv("SINKQUANT_FUSED_KERNEL", "0")
    monkeypatch.setattr(cpu, "_BUILT", {})
    assert best_isa() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_kernels() is None


def test_build_name_follows_every_source_byte_and_flag(tmp_path):
    files = []
    for path in source_files():
        shutil.copy(path, tmp_path / path.name)
        files.append(tmp_path / path.name)
    name = build_name("avx2", files)
    assert re.fullmatch(r"sinkquant_cpu_avx2_[0-9a-f]{12}", name)
    assert build_name("avx2", files) == name == build_name("avx2")  # the copies: the same bytes
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of one byte
        assert build_name("avx2", files) != name, path.name
        path.write_bytes(data)
    assert build_name("avx2", files) == name
    assert build_name("avx2", files, compile_flags=[*cflags("avx2"), "-g"]) != name
    contracting = [flag for flag in cflags("avx2") if flag != "-ffp-contract=off"]
    assert build_name("avx2", files, compile_flags=contracting) != name
    assert build_name("avx2", files, link_flags=[]) != name
    assert build_name("avx512", files).startswith("sinkquant_cpu_avx512_")


def test_every_file_in_csrc_is_built_and_packaged():
    tomllib = pytest.importorskip("tomllib")
    on_disk = {path.name for path in CSRC.iterdir() if path.is_file()}
    assert on_disk == {path.name for path in source_files()}  # each one is part of the build name
    pyproject = tomllib.loads((CSRC.parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sinkquant"]
    packaged = {
        path.name for pattern in patterns for path in CSRC.parent.glob(pattern) if path.parent == CSRC
    }
    assert packaged == on_disk


def _baton_build(calls):
    """A stand-in for torch's `load`: it takes torch's lock the way torch does, without waiting."""

    def build(build_dir):
        calls.append(build_dir)
        baton = FileBaton(str(build_dir / "lock"))
        if not baton.try_acquire():
            raise RuntimeError("torch's lock file is taken: load() would wait on it forever")
        baton.release()
        return "module"

    return build


def test_stale_torch_lock_is_removed_and_the_build_proceeds(tmp_path):
    calls = []
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "lock").touch()  # what a build killed inside torch's load leaves
    with pytest.warns(UserWarning, match="removed .*lock"):
        assert cached_build("ext", _baton_build(calls), root=tmp_path) == "module"
    assert calls == [tmp_path / "ext"] and not (tmp_path / "ext" / "lock").exists()
    with warnings.catch_warnings():  # nothing stale the second time: no warning
        warnings.simplefilter("error")
        assert cached_build("ext", _baton_build(calls), root=tmp_path) == "module"


def test_a_build_held_by_another_process_times_out_to_none(tmp_path):
    calls = []
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "lock").touch()  # torch's lock of the build in progress: not ours to remove
    holder = os.open(tmp_path / "ext" / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: conflicts as another process's lock would
    try:
        with pytest.warns(UserWarning, match="another process has been building"):
            assert cached_build("ext", _baton_build(calls), root=tmp_path, timeout=0.3) is None
        assert calls == [] and (tmp_path / "ext" / "lock").exists()
    finally:
        os.close(holder)  # as when that process ends or dies
    with pytest.warns(UserWarning, match="removed"):
        assert cached_build("ext", _baton_build(calls), root=tmp_path, timeout=0.3) == "module"


def test_a_failed_build_warns_once_per_machine(tmp_path):
    calls = []

    def no_compiler(build_dir):
        calls.append(build_dir)
        raise RuntimeError("c++: command not found")

    with pytest.warns(UserWarning, match="c[+][+]: command not found"):
        assert cached_build("ext", no_compiler, root=tmp_path) is None
    marker = failure_marker("ext", tmp_path)
    assert "c++: command not found" in marker.read_text()
    with warnings.catch_warnings():  # the next process: the marker, no warning, no second try
        warnings.simplefilter("error")
        assert cached_build("ext", no_compiler, root=tmp_path) is None
    assert len(calls) == 1
    marker.unlink()  # deleting the marker tries again
    assert cached_build("ext", _baton_build(calls), root=tmp_path) == "module"
    assert len(calls) == 2 and not marker.exists()


def test_fused_kernels_honours_a_failure_marker(tmp_path, monkeypatch):
    """The real entry point: a marker for this machine's build name skips the compile, silently."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_BUILT", {})
    failure_marker(build_name("avx2")).write_text("RuntimeError: no compiler\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_kernels("avx2") is None
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{build_name('avx2')}.failed"]
