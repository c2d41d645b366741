"""One model on vLLM: a generation, perplexity from prompt logprobs, decode speed. Run by bench_serving.py.

    <vllm-venv>/bin/python eval/bench/serving_worker.py MODEL_DIR WINDOWS.json OUT.json [--compile]

Runs inside vLLM's own virtual environment (vLLM 0.32 pins transformers < 5.20), by path, not as a
module of `eval`, so it imports nothing from sinkquant or eval.lib; a sinkquant checkpoint is served through the sinkquant-vllm plugin installed there.
WINDOWS.json holds the evaluation windows sinkquant's protocol cut (token ids, BOS included where the
tokenizer adds it), so both evaluators score the same tokens: the perplexity is exp of the mean of
-log p(token | prefix) over every token after the first of each window, from vLLM's prompt logprobs.
Decode speed: `max_tokens` new tokens after a short prompt, at batch 1 and batch 8 (the same prompt
eight times), timed three times each; the median is kept. Without --compile the engine runs eagerly
(enforce_eager), which spares the several minutes of torch.compile per model; every row of one run
uses the same mode.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

PROMPT = "The capital of France is"
DECODE_TOKENS = 64
REPEATS = 3


def main(
    model_dir: str, windows_path: str, out_path: str, compile_model: bool, score: bool = True, batches=(1, 8)
) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows = json.loads(open(windows_path).read())
    start = time.perf_counter()
    llm = LLM(
        model=model_dir,
        dtype="bfloat16",
        max_model_len=max(len(w) for w in windows) + 16,
        gpu_memory_utilization=0.25,  # on CPU: the share of memory vLLM reserves for its KV cache
        enforce_eager=not compile_model,
        seed=0,
    )
    load_s = time.perf_counter() - start
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    text = llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text

    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    nll, count = 0.0, 0
    scored = windows if score else []
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in scored], scoring, use_tqdm=False)
    for window, output in zip(scored, outputs, strict=True):
        for position, entry in enumerate(output.prompt_logprobs):
            if position == 0 or entry is None:
                continue
            nll -= entry[window[position]].logprob
            count += 1
    speed = {}
    decode = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    for batch in batches:
        llm.generate([PROMPT] * batch, decode, use_tqdm=False)  # warm-up
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            llm.generate([PROMPT] * batch, decode, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        speed[f"batch{batch}_tokens_per_s"] = batch * DECODE_TOKENS / statistics.median(times)
    result = {
        "model": model_dir,
        "load_s": round(load_s, 1),
        "generation": text,
        **({"perplexity": math.exp(nll / count)} if count else {}),
        "tokens": count,
        "windows": len(scored),
        "compiled": compile_model,
        **speed,
    }
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    flags = {"--compile", "--no-score"}
    args = [a for a in sys.argv[1:] if a not in flags]
    score = "--no-score" not in sys.argv[1:]
    main(*args, compile_model="--compile" in sys.argv[1:], score=score, batches=(1, 8) if score else (1,))
