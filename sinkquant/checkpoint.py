"""Checkpoints: save a quantized model as safetensors + config, load it back two ways.

OUT_DIR holds `model.safetensors` (no pickle), `config.json` with a `quantization_config`
(`quant_method: sinkquant`, the format version and every layer's shape spec), the tokenizer files,
`recipe.yaml`, `calibration.json` (the report's summary) and `sinkquant-manifest.json` (sha256 of every
safetensors file, checked on load). It is written into a temporary folder beside OUT_DIR and renamed at
the end, so an interrupted or failed save leaves nothing behind.

`load(OUT_DIR)` rebuilds the model strictly (missing, extra or mis-shaped tensors are errors);
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` works after `import sinkquant` through the quantizer
registered under "sinkquant" (`hf_quantizer.py`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, SinkQuantError
from .format import FORMAT_VERSION
from .hf_quantizer import SinkQuantConfig, replace_with_empty_modules
from .quantize.linear import SinkQuantLinear
from .stream.host import ModelHost, ResidentModel
from .stream.writer import SHARD_BYTES, ShardWriter

# Format versions: 1 stored the KV cache's key outlier channels as `kv_key_channels`, 2 as
# `key_outlier_idx` with per-layer specs; each layer feature's `since` (sinkquant/format/features)
# raises it for checkpoints whose layers use the feature. A checkpoint is written in the oldest format
# that holds it, so older readers keep reading checkpoints without the newer features.
MANIFEST = "sinkquant-manifest.json"

# -- saving ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder above `path` that exists (the output's parents are made only at save time)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that cannot be used, before any work is done; creates nothing."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"output folder {out} exists and is not empty; pass --overwrite or choose another folder"
        )
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise InputError(f"cannot create {out}: {base} is a file, not a folder; choose another output path")
    try:  # a real write, not os.access: root passes os.access on a read-only file system
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=base))
    except OSError as exc:
        raise InputError(
            f"cannot write into {base} ({exc.strerror or exc}); choose a folder you can write to"
        ) from exc
    return out


@contextlib.contextmanager
def out_dir_lock(out_dir: Path):
    """Hold the right to write `out_dir` for the block: a second run writing the same folder at the
    same time is refused at once instead of racing the first to the final rename. The lock is an
    advisory lock on a small file in the nearest existing folder above `out_dir` (released by the
    kernel if the process dies) and the file is removed at the end."""
    import fcntl

    target = out_dir.expanduser().absolute()
    name = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    path = _existing_ancestor(target) / f".sinkquant-lock-{name}"
    handle = open(path, "a+")  # noqa: SIM115  (held open for the whole block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise InputError(
                f"another sinkquant run is writing {out_dir} right now; wait for it to finish or choose "
                "another output folder"
            ) from exc
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        handle.close()


@contextlib.contextmanager
def atomic_dir(out_dir: Path, overwrite: bool):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on any failure
    (including Ctrl-C) it is removed, parent folders made for it are removed again, and `out_dir` is
    left as it was."""
    made = []
    parent = out_dir.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    tmp = None
    try:
        for folder in reversed(made):
            folder.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        yield tmp
        _apply_umask(tmp)
        if out_dir.exists():
            if not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
                raise InputError(f"output folder {out_dir} appeared while saving; pass --overwrite")
            backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(backup)
            try:
                tmp.rename(out_dir)
            except BaseException:
                backup.rename(out_dir)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _apply_umask(folder: Path) -> None:
    """Give the folder and its files the permissions a plain `open()` would (as `save_pretrained`
    does): `mkdtemp` and some writers create 0700/0600, which a serving process running as another
    user could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def check_finite(model: nn.Module) -> None:
    """Refuse NaN or Inf in any float tensor, naming it: quantizing them would spread them into scales."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise InputError(
                f"tensor {name} holds {kind} values; the model is broken — fix the weights before quantizing"
            )


class CheckpointWriter:
    """Writes a checkpoint into `folder` as its tensors become final (a `LayerWriter`): each decoder
    layer as soon as a job finishes it, then everything outside the layers, then the files around the
    tensors (`finish`). Tensors that are not part of a quantized layer are written in the dtype their
    source stored them in (a bf16 model's norms and embeddings stay bf16, whatever dtype the job
    computed in); tied weights are written once, as transformers writes them."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder = folder
        self.shards = ShardWriter(folder, shard_bytes)
        self.written: set[str] = set()

    def write_layer(self, host: ModelHost, index: int, layer: nn.Module) -> None:
        self._write(host, host.prefix(index), layer.state_dict())

    def write_outside(self, host: ModelHost) -> None:
        inside = host.prefix(0)[: -len("0.")]
        state = {k: v for k, v in host.model.state_dict().items() if not k.startswith(inside)}
        if (
            self.shards.pending_bytes + sum(t.numel() * t.element_size() for t in state.values())
            > self.shards.shard_bytes
        ):
            self.shards.flush()  # the layers' tensors leave memory before the embeddings and head come in
        self._write(host, "", state)

    def write_all(self, host: ModelHost) -> None:
        """Every tensor of a model already final (nothing left to compute)."""
        for index in range(len(host.layers)):
            with host.layer(index) as layer:
                self.write_layer(host, index, layer)
        with host.outside():
            self.write_outside(host)

    def _write(self, host: ModelHost, prefix: str, state: dict[str, torch.Tensor]) -> None:
        model = host.model
        quantized = {n + "." for n, m in model.named_modules() if isinstance(m, SinkQuantLinear)}
        for key, tensor in state.items():
            name = prefix + key
            if _is_tied_copy(model, name):
                continue
            if tensor.is_meta:  # not read for this job (a streamed embedding nothing changed): as stored
                stored = host.read_stored(name)
                if stored is None and name in (getattr(model, "all_tied_weights_keys", None) or {}):
                    continue  # a tied copy the source does not store either
                if stored is None:
                    raise SinkQuantError(
                        f"tensor {name} was never computed; the checkpoint would be incomplete"
                    )
                self.shards.add(name, stored)
                self.written.add(name)
                continue
            if tensor.is_floating_point() and not any(name.startswith(q) for q in quantized):
                stored = host.storage_dtype(name)
                tensor = tensor.to(stored) if stored is not None else tensor
            self.shards.add(name, tensor)
            self.written.add(name)

    def finish(self, config, tokenizer=None, recipe=None, report=None, generation_config=None) -> None:
        """The shards' final names and index, config.json (its dtype the one most tensors are stored
        in), the generation config, tokenizer, recipe, calibration summary and the sha256 manifest."""
        files = self.shards.finish()
        config.dtype = _main_float_dtype(self.folder, files)
        config.save_pretrained(self.folder)
        if generation_config is not None:
            generation_config.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        if recipe is not None:
            (self.folder / "recipe.yaml").write_text(recipe.to_yaml())
        if report is not None:
            (self.folder / "calibration.json").write_text(json.dumps(report.summary_dict(), indent=1))
        quantization = getattr(config, "quantization_config", None)
        manifest = {
            "format_version": getattr(quantization, "format_version", FORMAT_VERSION),
            "files": {n: _sha256(self.folder / n) for n in sorted(files)},
        }
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _is_tied_copy(model: nn.Module, name: str) -> bool:
    """Whether `name` is the second name of a tied weight (the LM head sharing the embedding)."""
    source = (getattr(model, "all_tied_weights_keys", None) or {}).get(name)
    if source is None:
        return False
    try:
        return model.get_parameter(name) is model.get_parameter(source)
    except AttributeError:  # the tied module was replaced (a quantized LM head): written on its own
        return False


def _main_float_dtype(folder: Path, files: list[str]) -> torch.dtype:
    from .stream.source import SafetensorsSource

    return SafetensorsSource(folder).float_dtype() if files else torch.float32


@contextlib.contextmanager
def checkpoint_writer(
    out_dir: str | os.PathLike, overwrite: bool = False, shard_bytes: int = SHARD_BYTES
) -> Iterator[CheckpointWriter]:
    """A `CheckpointWriter` into a temporary folder beside `out_dir`, renamed to `out_dir` when the
    block succeeds; on any failure (Ctrl-C, a full disk) nothing is left behind and `out_dir` is as it
    was."""
    out = prepare_out_dir(out_dir, overwrite)
    try:
        with atomic_dir(out, overwrite) as tmp:
            yield CheckpointWriter(tmp, shard_bytes)
    except OSError as exc:
        kept = "left as it was" if out.exists() else "not created"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SinkQuantError(
                f"the disk is full: writing the checkpoint failed, {out} was {kept} and the partial files were "
                "removed; free some space (or choose another disk) and run again"
            ) from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise InputError(
                f"cannot write the checkpoint into {out.parent} ({exc.strerror}); {out} was {kept}; "
                "choose a folder you can write to"
            ) from exc
        raise SinkQuantError(
            f"writing the checkpoint failed ({exc.strerror or exc}); {out} was {kept} and the partial files "
            "were removed"
        ) from exc


def save(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    recipe=None,
    report=None,
    overwrite: bool = False,
    storage_dtype: torch.dtype | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Save a quantized model in memory (safetensors only) atomically; returns the folder.
    `storage_dtype`: the dtype of the tensors outside the quantized layers (default: as held)."""
    check_finite(model)
    with checkpoint_writer(out_dir, overwrite, shard_bytes) as writer:
        writer.write_all(ResidentModel(model, storage_dtype=storage_dtype))
        writer.finish(model.config, tokenizer, recipe, report, getattr(model, "generation_config", None))
    return Path(out_dir).expanduser()


# -- loading --------------------------------------------------------------------------------------------


def verify_manifest(path: Path) -> None:
    """Check every safetensors file against the sha256 recorded at save time (and nothing extra is there),
    so a checkpoint changed on disk is refused instead of loaded as if it were the one saved."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise InputError(
            f"{path} has no {MANIFEST}, so its tensors cannot be checked; re-create the checkpoint with sinkquant, "
            "or pass --no-verify (verify=False) to load it unchecked"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
        version = int(manifest.get("format_version", FORMAT_VERSION))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{manifest_path} is unreadable or damaged; re-create the checkpoint (or pass --no-verify)"
        ) from exc
    if version > FORMAT_VERSION:
        raise InputError(
            f"this checkpoint uses sinkquant format {version}, newer than this sinkquant reads "
            f"({FORMAT_VERSION}); upgrade sinkquant (pip install -U sinkquant)"
        )
    unlisted = sorted(p.name for p in path.glob("*.safetensors") if p.name not in files)
    if unlisted:
        raise InputError(
            f"{path / unlisted[0]} was not written with this checkpoint (it is not in {MANIFEST}); remove it"
        )
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise InputError(f"{file} is missing from the checkpoint; copy the whole folder again")
        if _sha256(file) != digest:
            raise InputError(
                f"{file} does not match the sha256 recorded at save time: the file was changed or "
                "corrupted; re-create the checkpoint (or pass --no-verify / verify=False to load it anyway)"
            )


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path} holds no .safetensors file; sinkquant checkpoints never use pickle")
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(
                f"{file} is not a readable safetensors file ({exc}); it is truncated or corrupt: copy the "
                "checkpoint again or re-create it"
            ) from exc
    return shapes


def check_tensors(path: Path, config, qc: SinkQuantConfig) -> None:
    """Missing, extra or mis-shaped tensors are an error before anything is loaded."""
    from transformers import AutoModelForCausalLM

    stored = stored_shapes(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    replace_with_empty_modules(skeleton, qc.layers, device="meta")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = set()
    for target, source in (getattr(skeleton, "all_tied_weights_keys", None) or {}).items():
        tied.update({target, source})
    missing = sorted(k for k in set(expected) - set(stored) if k not in tied)
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:4])}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:4])}"] if extra else []
        )
        raise InputError(
            f"checkpoint {path} does not match its config: {'; '.join(parts)}; copy the checkpoint again or "
            "re-create it"
        )
    for key, shape in stored.items():
        if expected[key] != shape:
            raise InputError(f"checkpoint {path}: tensor {key} has shape {shape}, expected {expected[key]}")


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, verify: bool = True) -> nn.Module:
    """Load a sinkquant checkpoint strictly (sha256 manifest, every tensor present with its shape),
    then through `from_pretrained` and the registered quantizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a sinkquant checkpoint (no config.json)")
    if verify:
        verify_manifest(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}/config.json cannot be read: {str(exc).splitlines()[0]}") from exc
    qc = config.quantization_config
    qc = qc if isinstance(qc, SinkQuantConfig) else SinkQuantConfig.from_dict(qc)
    config.quantization_config = qc
    check_tensors(path, config, qc)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model
