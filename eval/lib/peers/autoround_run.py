"""Intel's AutoRound (sign-gradient rounding and clipping per decoder block) on a model, in its own venv.

    <venv>/bin/python eval/lib/peers/autoround_run.py MODEL CALIB_IDS.safetensors OUT_DIR [GROUP_SIZE] [PRESET] [SYM]

GROUP_SIZE defaults to 128, PRESET to `default`: the iterations and learning rate of AutoRound's own CLI
recipes (`default` 200 iterations at its default lr; `light` 50 at 5e-3; `best` 1000), SYM to 1 (its
W4A16 preset is symmetric). The calibration token ids come from the harness (the exact samples
sinkquant calibrates on) and set nsamples and seqlen; they are fed as batches of 8, the presets' batch.

Runs inside the virtual environment `eval/lib/peers/__init__.py` makes (auto-round 0.16 takes a newer
transformers than sinkquant pins), so it imports nothing from sinkquant. Writes:

* OUT_DIR/compressed: the checkpoint AutoRound saves (its `auto_round` format, packed int4);
* OUT_DIR/dense: the model after AutoRound's quantization, whose linear weights hold the rounded
  values (AutoRound quantizes in place and packs only on saving), saved as plain weights for the
  harness to score with sinkquant's evaluator;
* OUT_DIR/peer.json: versions, settings, timings, the bytes of the packed layers, and the largest logit difference between the packed
  checkpoint loaded back through transformers and the dense copy, when the packed one loads on this
  machine (so the dense copy is shown to be the same model).
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def quantized_bytes(folder: Path) -> int:
    """Bytes of the packed linear layers' tensors (codes, scales, zero points, group indices)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


#: AutoRound's CLI recipes (auto_round/cli/main.py RECIPES): iterations and learning rate (None: 1/iters)
PRESETS = {"default": (200, None), "light": (50, 5e-3), "best": (1000, None)}


def main(
    model_dir: str, ids_path: str, out: str, group_size: str = "128", preset: str = "default", sym: str = "1"
) -> None:
    from auto_round import AutoRound

    if preset not in PRESETS:
        raise SystemExit(f"unknown AutoRound preset {preset!r}: {', '.join(PRESETS)}")
    iters, lr = PRESETS[preset]
    extra = {} if lr is None else {"lr": lr}

    out_dir = Path(out)
    ids = load_file(ids_path)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = [ids[i : i + 8] for i in range(0, ids.shape[0], 8)]
    start = time.perf_counter()
    rounder = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme="W4A16",
        bits=4,
        group_size=int(group_size),
        sym=sym == "1",
        dataset=batches,
        iters=iters,
        nsamples=ids.shape[0],
        seqlen=ids.shape[1],
        batch_size=8,
        device_map="cpu",
        **extra,
    )
    rounder.quantize()
    seconds = time.perf_counter() - start

    dense_dir = out_dir / "dense"
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rounded = {k: v.detach().float() for k, v in rounder.model.state_dict().items()}
    state = {k: rounded[k] for k in fresh.state_dict() if k in rounded}
    missing = fresh.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise SystemExit(f"AutoRound's model lacks {missing[:3]}")
    fresh.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)

    compressed = out_dir / "compressed"
    rounder.save_quantized(str(compressed), format="auto_round")
    probe = ids[:1, :256]
    try:
        packed = AutoModelForCausalLM.from_pretrained(compressed, dtype=torch.float32)
        with torch.no_grad():
            diff = float((packed(input_ids=probe).logits - fresh(input_ids=probe).logits).abs().max())
    except Exception as exc:  # the packed format's CPU backend may be missing; the note says so
        diff = f"packed checkpoint did not load: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    info = {
        "auto_round": version("auto-round"),
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "scheme": f"W4A16: int4 {'symmetric' if sym == '1' else 'asymmetric'}, group {group_size}; "
        f"its `{preset}` recipe: {iters} iterations per block, lr {lr or '1/iters'}, batch 8",
        "group_size": int(group_size),
        "preset": preset,
        "iters": iters,
        "calibration": list(ids.shape),
        "quantize_s": round(seconds, 1),
        "compressed_bytes": sum(p.stat().st_size for p in compressed.glob("*.safetensors")),
        "quantized_bytes": quantized_bytes(compressed),
        "max_abs_logit_diff_dense_vs_compressed": diff,
    }
    (out_dir / "peer.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main(*sys.argv[1:7])
