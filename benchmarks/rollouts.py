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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import GenerationConfig

from fgrpo import tasks
from fgrpo.config import RunConfig
from fgrpo.model import add_lora, load_base, resolve_prompt_style
from fgrpo.rollouts import generate, prompt_texts
from fgrpo.runner import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="embedded", help="'embedded' (default), 'smollm2', a folder, a GGUF file")
    parser.add_argument("--tasks", help="tasks of the prompts (default: the run default; 1-digit arithmetic for a "
                        "chat model)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per task (default: 16)")
    args = parser.parse_args()
    quiet_libraries()
    arithmetic = ("basic_arithmetic:max_terms=2,min_digits=1,max_digits=1,allow_negation=False,"
                  "allow_parentheses=False,chain_sum:max_terms=2,max_digits=1")
    cfg = RunConfig(model=args.model, **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}),
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

    def ours() -> int:
        r = generate(model, tokenizer, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        return int(r.completion_mask.sum())

    @torch.no_grad()
    def raw() -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)[:, ids.shape[1]:]
        is_eos = out == tokenizer.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), out.shape[1])
        return int((first + (first < out.shape[1]).long()).sum())

    reps = 5 if args.quick else 15
    speeds: dict[str, list[float]] = {"ours": [], "raw": []}
    for rep in range(reps + 1):
        for name, fn in (("ours", ours), ("raw", raw)) if rep % 2 else (("raw", raw), ("ours", ours)):
            torch.manual_seed(rep)
            start = time.perf_counter()
            tokens = fn()
            if rep:  # the first repetition is the warm-up
                speeds[name].append(tokens / (time.perf_counter() - start))
    ours_tps, raw_tps = statistics.median(speeds["ours"]), statistics.median(speeds["raw"])
    print(f"ours {ours_tps:.0f} tokens/s, raw generate {raw_tps:.0f} tokens/s, ratio {ours_tps / raw_tps:.3f}")
    print(json.dumps({"benchmark": "rollouts", "model": cfg.model, "quick": args.quick, "repetitions": reps,
                      "sequences": len(ids),
                      "max_new_tokens": cfg.max_new_tokens, "ours_tokens_per_s": ours_tps,
                      "raw_tokens_per_s": raw_tps, "ratio": ours_tps / raw_tps}))


if __name__ == "__main__":
    main()
