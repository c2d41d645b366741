"""sha256 of every tensor in a checkpoint folder, to show two checkpoints hold identical numbers.

    python -m eval.bench.tensor_hashes OUT_DIR [--json FILE]
    python -m eval.bench.tensor_hashes --compare A.json B.json

Hashes cover each tensor's dtype, shape and raw bytes, so sharding, file order and safetensors
metadata do not matter: two folders agree exactly when every tensor name maps to the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from safetensors import safe_open


def tensor_hashes(folder: str | Path) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name).contiguous()
                digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
                hashes[name] = digest.hexdigest()
    return hashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?")
    parser.add_argument("--json", default=None)
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        print(f"{len(a)} vs {len(b)} tensors, {len(differ)} differ" + (f": {differ[:5]}" if differ else ""))
        return 1 if differ else 0
    hashes = tensor_hashes(args.folder)
    if args.json:
        Path(args.json).write_text(json.dumps(hashes, indent=1, sort_keys=True))
    print(f"{len(hashes)} tensors in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
