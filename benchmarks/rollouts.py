"""Rollout throughput: ``fgrpo.rollouts.generate`` vs raw ``model.generate`` with the KV cache.

Same model (the embedded default with a fresh LoRA adapter), same prompts (16 training prompts
of each default task, 8 completions each), same sampling settings and seed. Ours includes
tokenization, the completion mask and decoding; raw is the ``generate`` call alone on
pre-tokenized inputs. Throughput counts completion tokens up to and including EOS. Median of
the repetitions after one warm-up. Last line: one JSON object.

    python benchmarks/rollouts.py --quick     # 5 repetitions
    python benchmarks/rollouts.py             # 15 repetitions
    python benchmarks/rollouts.py --quick --model smollm2 --max-new-tokens 64 --prompts 4
        # the real SmolLM2-135M-Instruct on chat prompts of 1-digit arithmetic, 4 per task x 8
    python benchmarks/rollouts.py --quick --model smollm2 --max-new-tokens 64 --prompts 2 \
        --precisions float32,bfloat16,int8 --decode-bound
        # each rollout_precision (fgrpo.sampler) against bare generate on a model of the same precision
        # (float32; bfloat16: a bfloat16 copy; int8 has no bare counterpart), and one-row decode steps
        # against the weights' bytes / the machine's read bandwidth, measured in the same run

int8 is measured here only (fgrpo does not offer it): every linear weight quantized per output channel,
run by PyTorch's dynamic-quantization kernel (``Int8DynamicLinear``). For each precision the mismatch
against the float32 policy is printed too: the mean and largest |log pi - log pi_sampler| per completion
token, the mean sequence_mask weight and the share of sequences it masks (cap 3), and the mean length.

The CPU model and whether it has native bfloat16 (avx512_bf16 / amx_bf16), what ``auto`` chooses
for this model, and the sampler's kernels ``fgrpo.kernels`` chose for each precision (measured once per
machine, or read from its cache) are printed first. Where the choice is not the default kernels, ours is
also timed on the default kernels (``ours_<precision>_default_kernels``), and where decoding uses the lean
step (``fgrpo.decode_step``), on transformers' forward for every step (``ours_<precision>_transformers_step``);
with --decode-bound, the one-row decode step and the LM head are timed on the default kernels and on the
chosen ones, and the chosen ones on transformers' step, side by side. One row:
``--group-size 1 --prompts 1 --tasks chain_sum:max_terms=2,max_digits=1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from fgrpo import decode_step, kernels, tasks
from fgrpo.config import RunConfig
from fgrpo.grpo import sampler_correction
from fgrpo.model import add_lora, load_base, resolve_prompt_style
from fgrpo.rollouts import decode, generate, per_token_logps, prompt_texts
from fgrpo.runner import quiet_libraries
from fgrpo.sampler import (
    LOW_PRECISION,
    NATIVE_BF16_FLAGS,
    cpu_flags,
    plain_linears,
    resolve_rollout_precision,
    sampler_choice,
    sampler_linear,
    sampler_weights,
)


class Int8DynamicLinear(torch.nn.Module):
    """y = x W^T + b with W quantized to int8 (symmetric, one scale per output channel) and x quantized per
    batch on the fly: PyTorch's dynamic-quantization kernel (``quantized.linear_dynamic``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()  # [out]: |W_i| max -> 127
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.13
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, as torch's dynamic Linear does on x86 (no int16 overflow)
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)


LOW_PRECISION.setdefault("int8", Int8DynamicLinear)


def read_bandwidth(gib: float = 1.0, repeats: int = 9) -> float:
    """Bytes per second of reading a float32 tensor of ``gib`` GiB once (``sum``), the fastest of ``repeats``:
    the limit is what the machine can do (on a shared 2-core VM the median swung from 26 to 37 GB/s)."""
    big = torch.ones(int(gib * 2**30 / 4))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / min(times[1:])


def weight_bytes(model, precision: str) -> int:
    """Bytes a decode step reads: every linear weight (LoRA merged; the LM head included) at ``precision``,
    the rest (norms) in float32; the embedding lookup reads one row."""
    size = {"float32": 4, "bfloat16": 2, "int8": 1}[precision]
    total = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            total += module.weight.numel() * size
        elif "RMSNorm" in type(module).__name__:
            total += module.weight.numel() * 4
    return total


@contextmanager
def forced(choice: kernels.Choice | None, lean: bool | None = None):
    """Run inside with the sampler's kernels set to ``choice`` (None: the measured choice) and the lean decode
    step used or not (``decode_step.FORCED``; None: its default)."""
    kernels.FORCED, decode_step.FORCED = choice, lean
    try:
        yield
    finally:
        kernels.FORCED, decode_step.FORCED = None, None


@torch.inference_mode()
def head_ms(model, precision: str, kernel: str, reps: int = 10) -> float:
    """Median milliseconds of the LM head (the largest frozen linear layer) for one row, as ``kernel``."""
    head = max((child for _, _, child in plain_linears(model)), key=lambda m: m.weight.numel())
    layer, x = sampler_linear(kernel, precision, head.weight, head.bias), torch.randn(1, head.in_features)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


@torch.inference_mode()
def decode_step_ms(model, tokenizer, precision: str, steps: int = 32) -> float:
    """Median milliseconds of one decode step with one row, on the sampler's weights at ``precision``: the time
    of ``8 + steps`` tokens less that of 8 (the prefill, the first step and the cache's set-up cancel), / steps."""
    ids = tokenizer(["Solve the task. " * 4], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)

    def seconds(tokens: int) -> float:
        start = time.perf_counter()
        decode(model, ids, mask, tokens, -1, 0, greedy=True)  # EOS -1: never stops
        return time.perf_counter() - start

    with sampler_weights(model, precision, 1):
        seconds(8)  # warm-up
        times = [(seconds(8 + steps) - seconds(8)) / steps for _ in range(5)]
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="embedded", help="'embedded' (default), 'smollm2', a folder, a GGUF file")
    parser.add_argument("--tasks", help="tasks of the prompts (default: the run default; 1-digit arithmetic for a "
                        "chat model)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per task (default: 16)")
    parser.add_argument("--group-size", type=int, help="completions per prompt (default: the run default, 8); "
                        "1 row: --group-size 1 --prompts 1 and one task")
    parser.add_argument("--precisions", default="float32", help="rollout precisions to measure, comma-separated "
                        "(float32, bfloat16, int8; default: float32)")
    parser.add_argument("--repetitions", type=int, help="timed repetitions (default: 5 with --quick, 3 for "
                        "several precisions of a real model, else 15; 0: only the mismatch)")
    parser.add_argument("--decode-bound", action="store_true", help="also one-row decode steps against the "
                        "weights' bytes / read bandwidth")
    args = parser.parse_args()
    quiet_libraries()
    arithmetic = ("basic_arithmetic:max_terms=2,min_digits=1,max_digits=1,allow_negation=False,"
                  "allow_parentheses=False,chain_sum:max_terms=2,max_digits=1")
    cfg = RunConfig(model=args.model, **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}),
                    **({"group_size": args.group_size} if args.group_size else {}),
                    tasks=args.tasks or (arithmetic if args.model != "embedded" else RunConfig().tasks))
    base, tokenizer = load_base(cfg.model, torch.device("cpu"), cfg.warm_start_steps, cfg.cache_dir)
    model = add_lora(base, cfg.lora_r, cfg.lora_alpha, 0.0, seed=0)
    model.eval()
    examples = [e for t in cfg.task_list for e in tasks.train_split(t, args.prompts, seed=0)]
    if resolve_prompt_style(cfg.prompt_style, cfg.model, tokenizer) == "chat":
        examples = [tasks.as_chat(e, cfg.system_prompt) for e in examples]
    prompts = prompt_texts(tokenizer, examples)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = enc["input_ids"].repeat_interleave(cfg.group_size, 0)
    mask = enc["attention_mask"].repeat_interleave(cfg.group_size, 0)
    gen_config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                                  top_p=cfg.top_p, top_k=0, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, use_cache=True)

    precisions = args.precisions.split(",")
    flags = cpu_flags()
    parameters = sum(p.numel() for p in base.parameters())
    machine = {"cpu": kernels.cpu_name(), "native_bf16_flags": sorted(NATIVE_BF16_FLAGS & flags),
               "auto_chooses": resolve_rollout_precision("auto", torch.device("cpu"), parameters),
               "torch_threads": torch.get_num_threads()}
    print(f"machine: {machine}")
    chosen = {p: sampler_choice(model, p, len(ids)) for p in precisions if p in kernels.DTYPES}
    for p, choice in chosen.items():  # measured (or read from the cache) for the rollout batch and 1 row
        print(f"{p}: kernels {choice} (default {kernels.DEFAULT})")
    bare = {"float32": model}
    if "bfloat16" in precisions:
        bare["bfloat16"] = copy.deepcopy(model).to(torch.bfloat16)

    def ours(precision: str, choice: kernels.Choice | None = None, lean: bool | None = None) -> int:
        with forced(choice, lean):
            r = generate(model, tokenizer, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                         precision=precision)
        return int(r.completion_mask.sum())

    def raw(precision: str) -> int:
        with torch.no_grad():
            out = bare[precision].generate(input_ids=ids, attention_mask=mask,
                                           generation_config=gen_config)[:, ids.shape[1]:]
        is_eos = out == tokenizer.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), out.shape[1])
        return int((first + (first < out.shape[1]).long()).sum())

    runs = [(f"ours_{p}", lambda p=p: ours(p)) for p in precisions]
    runs += [(f"ours_{p}_default_kernels", lambda p=p: ours(p, kernels.DEFAULT)) for p, c in chosen.items()
             if c != kernels.DEFAULT]
    if decode_step.lean_by_default(model):  # and on transformers' forward for every step
        runs += [(f"ours_{p}_transformers_step", lambda p=p: ours(p, lean=False)) for p in precisions]
    runs += [(f"raw_{p}", lambda p=p: raw(p)) for p in precisions if p in bare]
    reps = 3 if args.quick and args.model != "embedded" and len(precisions) > 1 else 5 if args.quick else 15
    reps = reps if args.repetitions is None else args.repetitions  # 0: no timing, the mismatch only
    speeds: dict[str, list[float]] = {name: [] for name, _ in runs}
    for rep in range(reps + 1 if reps else 0):
        for name, fn in runs if rep % 2 else runs[::-1]:
            torch.manual_seed(rep)
            start = time.perf_counter()
            tokens = fn()
            if rep:  # the first repetition is the warm-up
                speeds[name].append(tokens / (time.perf_counter() - start))
    tps = {name: statistics.median(v) for name, v in speeds.items() if v}
    result = {"benchmark": "rollouts", "kernels": {p: str(c) for p, c in chosen.items()},
              "model": cfg.model, "quick": args.quick, "repetitions": reps,
              "sequences": len(ids), "max_new_tokens": cfg.max_new_tokens, **machine,
              **{f"{name}_tokens_per_s": v for name, v in tps.items()}}
    for p in precisions if tps else []:
        line = f"{p}: ours {tps[f'ours_{p}']:.0f} tokens/s"
        if f"ours_{p}_default_kernels" in tps:
            line += f" (default kernels {tps[f'ours_{p}_default_kernels']:.0f})"
        if f"ours_{p}_transformers_step" in tps:
            line += f" (transformers' step {tps[f'ours_{p}_transformers_step']:.0f})"
        if f"raw_{p}" in tps:
            result[f"ratio_{p}_to_raw_same_precision"] = tps[f"ours_{p}"] / tps[f"raw_{p}"]
            line += f", bare generate {tps[f'raw_{p}']:.0f}, ratio {result[f'ratio_{p}_to_raw_same_precision']:.3f}"
        result[f"ratio_{p}_to_raw_float32"] = tps[f"ours_{p}"] / tps["raw_float32"] if "raw_float32" in tps else None
        print(line)
    if "ours_float32" in tps and "raw_float32" in tps:
        result["ratio"] = tps["ours_float32"] / tps["raw_float32"]
    for p in precisions:  # how far each sampler is from the float32 policy
        torch.manual_seed(0)
        r = generate(model, tokenizer, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                     precision=p)
        with torch.no_grad():
            policy = per_token_logps(model, r, cfg.temperature)
        _, stats = sampler_correction(policy, r.sampler_logps, r.completion_mask, "sequence_mask", 3.0)
        stats["mean_length"] = float(r.completion_mask.sum(1).float().mean())
        result.update({f"{k}_{p}": v for k, v in stats.items()})
        print(f"{p}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    if args.decode_bound:
        bandwidth = read_bandwidth()
        result["read_bandwidth_gb_per_s"] = bandwidth / 1e9
        for p in chosen:  # default kernels against the chosen ones, side by side
            one_row = sampler_choice(model, p, 1)
            for name, c in (("default", kernels.DEFAULT), ("chosen", one_row)):
                with forced(c):
                    result[f"decode_step_ms_{p}_{name}_kernels"] = decode_step_ms(model, tokenizer, p)
                result[f"lm_head_ms_{p}_{name}_kernels"] = head_ms(model, p, c.head)
            step, head = (tuple(result[f"{k}_ms_{p}_{n}_kernels"] for n in ("default", "chosen"))
                          for k in ("decode_step", "lm_head"))
            with forced(one_row, lean=False):
                result[f"decode_step_ms_{p}_transformers_step"] = decode_step_ms(model, tokenizer, p)
            plain = result[f"decode_step_ms_{p}_transformers_step"]
            print(f"{p}: one row, default kernels {kernels.DEFAULT} / chosen {one_row}: decode step "
                  f"{step[0]:.1f} / {step[1]:.1f} ms (chosen on transformers' step: {plain:.1f} ms), "
                  f"LM head {head[0]:.2f} / {head[1]:.2f} ms")
        for p in precisions:
            ms = decode_step_ms(model, tokenizer, p)
            floor = 1000 * weight_bytes(model, p) / bandwidth
            result[f"decode_step_ms_{p}"], result[f"decode_floor_ms_{p}"] = ms, floor
            result[f"fraction_of_bandwidth_limit_{p}"] = floor / ms
            print(f"{p}: one-row decode step {ms:.1f} ms; weights {weight_bytes(model, p) / 1e6:.0f} MB / "
                  f"{bandwidth / 1e9:.1f} GB/s = {floor:.1f} ms: {floor / ms:.2f} of the limit")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
