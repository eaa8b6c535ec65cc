"""The peers of decode.py: batch-1 greedy prefill and decode in HF transformers or llama.cpp.

Self-contained (torch + transformers + gguf, or llama-cpp-python; nothing from this project),
so it runs in any interpreter that has them; decode.py runs it once per engine, in a fresh
process, on the same GGUF file and the same prompt token ids as our run:
  PEER_PYTHON experiments/benchmarks/decode_peer.py --engine hf \
      --gguf SmolLM2-135M-Instruct.Q4_1.gguf --prompt-ids prompt.json --new-tokens 128 --out hf.json

Engines:
  hf: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` at float32, which dequantizes
    the GGUF tensors to the same fp32 weights ours uses. Prefill is one forward over the prompt
    with use_cache=True and logits_to_keep=1 (as `generate` does: no LM head on the other
    positions); decode is a greedy loop feeding one token with past_key_values (HF's default
    DynamicCache), all under torch.inference_mode.
  llama.cpp: `llama_cpp.Llama` on the GGUF. Its matmuls run on the quantized blocks directly
    (SmolLM2's file: Q4_1, and Q8_0 for the tied embedding / LM head; activations quantized to
    8 bits), not on fp32 weights, so by design it reads ~5x fewer weight bytes per token. Prefill is `llm.eval(prompt)` in one batch; decode is a loop of
    `llm.eval([token])` and an argmax over the last logits (greedy, the same as temperature 0).

Timing, the same as decode.py's for ours: one untimed warm-up run, then `--repeats` runs; in
each, prefill = the call that yields the first new token, decode = the other N-1 tokens. EOS is
ignored so every run decodes exactly N tokens. Prints progress to stderr; writes JSON to --out
(and prints it as the last stdout line).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

Run = Callable[[], tuple[float, float, list[int]]]  # -> (prefill_s, decode_s, new token ids)


def load_hf_fp32(gguf: pathlib.Path):
    """(model, how it was loaded): a plain fp32 torch model with the GGUF's dequantized weights.

    `from_pretrained(gguf_file=...)` when accelerate is installed (it refuses GGUF files
    without it, though it does not need it on CPU); otherwise the same reader it calls,
    `load_gguf_checkpoint`, into a model built from the GGUF's config. The two give identical
    tensors. Newer transformers can keep GGUF weights packed (GgufConfig); dequantize=True
    asks for dense fp32 weights, as ours uses.
    """
    import torch
    import transformers
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        kwargs = {}
        if hasattr(transformers, "GgufConfig"):
            kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
        loader = "AutoModelForCausalLM.from_pretrained(gguf_file=...)"
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
        result = model.load_state_dict(tensors["tensors"], strict=False)
        missing = set(result.missing_keys) - {"lm_head.weight"}  # tied to the embedding
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{gguf}: missing {sorted(missing)}, unexpected {result.unexpected_keys}"
            )
        model.tie_weights()
        loader = "load_gguf_checkpoint into AutoModelForCausalLM.from_config (no accelerate)"
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear:
            raise RuntimeError(f"{name} is a {type(module).__name__}, not a dense nn.Linear")
        if isinstance(weight, torch.Tensor) and weight.dtype != torch.float32:
            raise RuntimeError(f"{name}.weight is {weight.dtype}, expected torch.float32")
    return model, loader


def hf_engine(gguf: pathlib.Path, prompt: Sequence[int], new_tokens: int, threads: int):
    """(run, info) for Hugging Face transformers on the GGUF's dequantized fp32 weights."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    model, loader = load_hf_fp32(gguf)
    model.eval()
    ids = torch.tensor([list(prompt)], dtype=torch.long)

    @torch.inference_mode()
    def run() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        tokens = [int(token)]  # .item() waits for the forward: eager CPU is synchronous anyway
        prefill_s = time.perf_counter() - start
        past = out.past_key_values
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
        return prefill_s, time.perf_counter() - start, tokens

    info = {
        "engine": "hf",
        "weights": "fp32 (GGUF dequantized by transformers)",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": torch.get_num_threads(),
        "loader": loader,
        "dtype": str(next(model.parameters()).dtype),
        "attn_implementation": model.config._attn_implementation,
    }
    return run, info


def llama_cpp_engine(gguf: pathlib.Path, prompt: Sequence[int], new_tokens: int, threads: int):
    """(run, info) for llama.cpp computing on the GGUF's quantized blocks."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=len(prompt) + new_tokens + 16,
        n_batch=len(prompt),  # the whole prompt in one batch, as ours and HF prefill it
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        # With logits_all=False only the batch's last position has logits (row -1).
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    def run() -> tuple[float, float, list[int]]:
        llm.reset()  # the next eval drops the previous run's KV cache entries
        start = time.perf_counter()
        llm.eval(list(prompt))
        tokens = [next_token()]
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        return prefill_s, time.perf_counter() - start, tokens

    info = {
        "engine": "llama.cpp",
        "weights": "GGUF blocks as stored (quantized matmuls)",
        "llama_cpp_python_version": llama_cpp.__version__,
        "threads": threads,
        "threads_batch": threads,
        "n_batch": len(prompt),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }
    return run, info


ENGINES = {"hf": hf_engine, "llama.cpp": llama_cpp_engine}


def time_runs(run: Run, prompt_tokens: int, new_tokens: int, repeats: int, check: int) -> dict:
    """One untimed warm-up run, then `repeats` timed runs; medians and tokens/s."""
    start = time.perf_counter()
    _, _, warm_ids = run()
    first_run_s = time.perf_counter() - start
    prefill, decode, same = [], [], True
    for _ in range(repeats):
        prefill_s, decode_s, ids = run()
        prefill.append(prefill_s)
        decode.append(decode_s)
        same = same and ids == warm_ids
    if len(warm_ids) != new_tokens:
        raise RuntimeError(f"decoded {len(warm_ids)} tokens, expected {new_tokens}")
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    return {
        "first_run_s": first_run_s,
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_s_median": prefill_s,
        "decode_s_median": decode_s,
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None,
        "decode_ms_per_token": 1e3 * decode_s / (new_tokens - 1) if new_tokens > 1 else None,
        "first_ids": warm_ids[:check],
        "runs_agree": same,  # greedy decoding is deterministic run to run
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True, choices=sorted(ENGINES))
    p.add_argument("--gguf", required=True, help="the model's .gguf file")
    p.add_argument("--prompt-ids", required=True, help="a JSON list of prompt token ids")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: os.cpu_count()")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy ids kept for the check")
    p.add_argument("--out", default="", help="JSON path (also printed as the last stdout line)")
    args = p.parse_args(argv)
    if args.new_tokens < 1 or args.repeats < 1:
        raise ValueError(
            f"--new-tokens={args.new_tokens} and --repeats={args.repeats} must be >= 1"
        )

    prompt = json.loads(pathlib.Path(args.prompt_ids).read_text())
    threads = args.threads or os.cpu_count() or 1
    start = time.perf_counter()
    run, info = ENGINES[args.engine](pathlib.Path(args.gguf), prompt, args.new_tokens, threads)
    load_s = time.perf_counter() - start
    print(f"{args.engine}: loaded in {load_s:.1f}s; timing", file=sys.stderr)
    result = {
        **info,
        "python": platform.python_version(),
        "load_s": load_s,
        **time_runs(run, len(prompt), args.new_tokens, args.repeats, args.check_tokens),
    }
    text = json.dumps(result)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    return result


if __name__ == "__main__":
    main()
