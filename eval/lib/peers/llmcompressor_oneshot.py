"""llm-compressor's W4A16 recipes on a model, run in its own venv: GPTQ, AWQ, and AWQ then GPTQ.

    <venv>/bin/python eval/lib/peers/llmcompressor_oneshot.py MODEL CALIB_IDS.safetensors OUT_DIR [GROUP_SIZE] [METHOD]

METHOD (default gptq):

* `gptq`: `GPTQModifier`, int4 symmetric (the W4A16 preset's grid) in groups of GROUP_SIZE;
* `awq`: `AWQModifier` (its default mappings and grid) then `QuantizationModifier`, int4 asymmetric
  (W4A16_ASYM, the scheme llm-compressor's AWQ examples use);
* `awq-gptq`: `AWQModifier` then `GPTQModifier` on the asymmetric grid, the chain llm-compressor documents.

GROUP_SIZE defaults to 128 (the W4A16 presets). llm-compressor refuses a group size that does not divide
every layer's input width (SmolLM2's 576 is not a multiple of 128), and crashes when that check is
bypassed, so the harness asks for the largest group size that divides them all (64 on SmolLM2) and says so.

Runs inside the virtual environment that `eval/lib/peers/__init__.py` makes (llmcompressor 0.14 pins
transformers <= 5.17, which sinkquant does not support), so it imports nothing from sinkquant. The
calibration token ids come from the harness (the exact samples sinkquant calibrates on). Writes:

* OUT_DIR/compressed: the compressed-tensors checkpoint llm-compressor saves;
* OUT_DIR/dense: the same checkpoint loaded back through transformers (compressed-tensors decompresses
  it) and saved as plain weights, for the harness to score with sinkquant's evaluator;
* OUT_DIR/peer.json: versions, settings, timings, and the largest logit difference between the loaded
  compressed checkpoint and the dense copy (so the dense copy is shown to be the same model).
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig


def recipe_for(method: str, group_size: int) -> tuple[list, str]:
    """The modifiers of `method` and a line describing them."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    symmetric = method == "gptq"
    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    grid = f"int4 {'symmetric' if symmetric else 'asymmetric'}, group {group_size}; lm_head ignored"
    if method == "gptq":
        gptq = "GPTQModifier defaults (actorder static, block 128, dampening 0.01)"
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])], f"W4A16: {grid}; {gptq}"
    if method == "awq":
        return (
            [
                AWQModifier(),
                QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
            ],
            f"W4A16: {grid}; AWQModifier defaults (mappings from the architecture, duo scaling, 20 grid points)",
        )
    if method == "awq-gptq":
        return [
            AWQModifier(),
            GPTQModifier(config_groups=groups, ignore=["lm_head"]),
        ], f"W4A16: {grid}; AWQModifier defaults, then GPTQModifier defaults"
    raise SystemExit(f"unknown method {method!r}: gptq, awq or awq-gptq")


def allow_cpu_only_awq() -> bool:
    """llm-compressor 0.14's AWQ pins its cached activations in page-locked memory before each grid
    search, unconditionally, and a CPU-only torch refuses (`Cannot access accelerator device`). Pinning
    only speeds host-to-GPU copies, so without a GPU it is skipped; the numbers are unchanged."""
    if torch.cuda.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return True


def main(model_dir: str, ids_path: str, out: str, group_size: str = "128", method: str = "gptq") -> None:
    from llmcompressor import oneshot

    unpinned = allow_cpu_only_awq() if method.startswith("awq") else False

    out_dir = Path(out)
    ids = load_file(ids_path)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    recipe, described = recipe_for(method, int(group_size))
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    compressed = out_dir / "compressed"
    model.save_pretrained(compressed, save_compressed=True)
    tokenizer.save_pretrained(compressed)

    loaded = AutoModelForCausalLM.from_pretrained(  # decompressed into dense, dequantized weights
        compressed, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v for k, v in loaded.state_dict().items() if k in dense.state_dict()}
    missing = dense.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise SystemExit(f"the decompressed checkpoint lacks {missing[:3]}")
    dense.save_pretrained(out_dir / "dense")
    tokenizer.save_pretrained(out_dir / "dense")
    probe = ids[:1, :256]
    with torch.no_grad():
        diff = float((loaded(input_ids=probe).logits - dense(input_ids=probe).logits).abs().max())
    info = {
        "llmcompressor": version("llmcompressor"),
        "compressed_tensors": version("compressed-tensors"),
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "method": method,
        "cpu_only_pinning_skipped": unpinned,
        "scheme": described,
        "group_size": int(group_size),
        "calibration": list(ids.shape),
        "quantize_s": round(seconds, 1),
        "compressed_bytes": sum(p.stat().st_size for p in compressed.glob("*.safetensors")),
        "max_abs_logit_diff_dense_vs_compressed": diff,
    }
    (out_dir / "peer.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main(*sys.argv[1:6])
