"""One local GRPO step, ours vs TRL's GRPOTrainer, on the same work, interleaved in one process.

A step is: sample B prompts x G completions (KV-cached sampling), score them with the same
verifier, group advantages, the GRPO loss, backward, gradient clipping and one AdamW step on the
LoRA parameters. Both sides get the same base model, the same LoRA adapter config (rank 16 on
every linear layer, no dropout), the same prompts, B, G, max completion length, temperature,
loss type ("grpo"), beta (0), mu (1), epsilon, learning rate and max grad norm, fp32 on the CPU.
The learning rate is 0 unless ``--lr`` says otherwise: every step still runs the optimizer, but
the two policies, which sample their own completions, stay the same distribution, so their
completion lengths (the work of a step) match in expectation; each side's mean completion length
is reported next to its time. (At a learning rate, the two policies drift apart and so does the
work of their steps.)
TRL runs with ``gradient_checkpointing=False`` (its default is True, which would only slow it
down here) and no logging of completions.

The two are interleaved: a TRL ``TrainerCallback`` times each TRL step (on_step_begin ->
on_step_end) and then runs and times one of ours, so both see the same machine state. The
first ``--warmup`` pairs are dropped; the median of the rest is reported.

Models: the embedded default (0.87 M parameters) and a 24 M-parameter Llama built from a config
(hidden 512, 7 layers, random weights: it always writes the full completion length, which is
the same work for both sides); or, with ``--model``, any model fgrpo loads, such as the real
SmolLM2-135M-Instruct (``smollm2``), on chat prompts of ``--tasks`` (TRL gets the same messages as a
conversational dataset and applies the same chat template), at each of ``--max-new-tokens``.

    python benchmarks/step_vs_trl.py --quick     # 5 timed pairs per model after 1 warm-up
    python benchmarks/step_vs_trl.py             # 15 timed pairs per model after 2 warm-up
    python benchmarks/step_vs_trl.py --quick --model smollm2 --max-new-tokens 64,256 \
        --prompts-per-step 4 --group-size 4     # the real model, B x G = 16 completions per step
    ... --rollout-precision int8                # ours sampling from int8 weights (with the correction)
    ... --steps 3                               # fewer timed pairs (each SmolLM2 pair takes 40-120 s)

TRL runs in float32 (``bf16=False``); ``--rollout-precision`` changes only our side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from fgrpo import tasks
from fgrpo.config import RunConfig
from fgrpo.grpo import GRPOSettings, local_grpo
from fgrpo.model import add_lora, char_tokenizer, embedded_model_path, load_base, model_folder, resolve_prompt_style
from fgrpo.runner import quiet_libraries

LARGE_CONFIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=7, num_attention_heads=8,
                    num_key_value_heads=8, max_position_embeddings=128, tie_word_embeddings=True)


def large_model_path(folder: str) -> str:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LARGE_CONFIG)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compare(path: str, cfg: RunConfig, steps: int, warmup: int, lr: float, rollout_precision: str = "float32",
            ) -> dict:
    """Median seconds per step of ours and of TRL's, interleaved, and each side's mean completion length;
    returns one result row."""
    import trl

    # ours: the same code path a client runs (fgrpo.grpo.local_grpo), one step per call
    base, tokenizer = load_base(path, torch.device("cpu"), cfg.warm_start_steps, cfg.cache_dir)
    chat = resolve_prompt_style(cfg.prompt_style, path, tokenizer) == "chat"
    examples = [e for t in cfg.task_list for e in tasks.train_split(t, 64, seed=0)]
    examples = [tasks.as_chat(e, cfg.system_prompt) for e in examples] if chat else examples
    by_prompt = {e.prompt: e for e in examples}

    def text(message) -> str:  # TRL passes conversational prompts and completions as message lists
        return message[-1]["content"] if isinstance(message, list) else message

    def trl_reward(prompts, completions, **_):
        return [tasks.correctness(by_prompt[text(p)], text(c)) for p, c in zip(prompts, completions)]

    parameters = sum(p.numel() for p in base.parameters())
    model = add_lora(base, cfg.lora_r, cfg.lora_alpha, 0.0, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    settings = GRPOSettings.from_config(cfg, 1, rollout_precision)
    order = torch.Generator().manual_seed(1)

    def our_batches():
        while True:
            idx = torch.randperm(len(examples), generator=order)[:cfg.prompts_per_step].tolist()
            yield [examples[i] for i in idx]

    batches = our_batches()
    times: dict[str, list[float]] = {"ours": [], "trl": []}
    lengths: dict[str, list[float]] = {"ours": [], "trl": []}  # mean completion tokens per step

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["trl"].append(time.perf_counter() - self.start)
            start = time.perf_counter()
            result = local_grpo(model, tokenizer, optimizer, batches, tasks.correctness, settings)
            times["ours"].append(time.perf_counter() - start)
            lengths["ours"].append(result.metrics["completion_length"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths["trl"].append(float(logs["completions/mean_length"]))

    n = cfg.prompts_per_step * cfg.group_size
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, loss_type="grpo", beta=0.0, num_iterations=1,
        epsilon=0.2, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, max_steps=steps + warmup,
        gradient_checkpointing=False, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    train = Dataset.from_dict({"prompt": [[{"role": r, "content": c} for r, c in e.messages] if chat else e.prompt
                                          for e in examples]})
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trl_tokenizer = load_base(path, torch.device("cpu"), cfg.warm_start_steps, cfg.cache_dir)[1]
    trainer = trl.GRPOTrainer(model=model_folder(path, cfg.warm_start_steps, cfg.cache_dir), reward_funcs=trl_reward,
                              args=args, train_dataset=train, processing_class=trl_tokenizer,
                              peft_config=peft_config, callbacks=[Interleave()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    ours, theirs = statistics.median(times["ours"][warmup:]), statistics.median(times["trl"][warmup:])
    return {"parameters": parameters, "ours_s": ours, "trl_s": theirs, "ratio": ours / theirs,
            "steps": len(times["ours"][warmup:]), "ours_length": statistics.mean(lengths["ours"][warmup:]),
            "trl_length": statistics.mean(lengths["trl"][warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", help="one model instead of embedded + 24M: 'smollm2', a folder, a GGUF file")
    parser.add_argument("--tasks", default="basic_arithmetic:max_terms=2,min_digits=1,max_digits=1,"
                        "allow_negation=False,allow_parentheses=False,chain_sum:max_terms=2,max_digits=1",
                        help="tasks of --model's prompts (default: 1-digit arithmetic)")
    parser.add_argument("--max-new-tokens", help="comma-separated completion lengths (default: the run default)")
    parser.add_argument("--prompts-per-step", type=int)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--rollout-precision", default="float32", choices=("float32", "bfloat16", "int8"),
                        help="our rollouts' precision (default float32)")
    parser.add_argument("--steps", type=int, help="timed pairs (default: 5 with --quick, else 15)")
    parser.add_argument("--lr", type=float, default=0.0,
                        help="learning rate of both sides (default 0: the optimizer step runs, the policy stays put)")
    args = parser.parse_args()
    quiet_libraries()
    base = {k: v for k, v in {"prompts_per_step": args.prompts_per_step, "group_size": args.group_size}.items()
            if v is not None}
    cfg = RunConfig(**base)
    steps, warmup = (5, 1) if args.quick else (15, 2)
    steps = args.steps or steps
    lengths = [int(x) for x in args.max_new_tokens.split(",")] if args.max_new_tokens else [cfg.max_new_tokens]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = ({args.model: args.model} if args.model else
                 {"embedded": str(embedded_model_path(cfg.warm_start_steps, cfg.cache_dir)),
                  "24M": large_model_path(folder)})
        for name, path in paths.items():
            for length in lengths:
                run_cfg = RunConfig(**base, max_new_tokens=length, **({"tasks": args.tasks} if args.model else {}))
                row = compare(path, run_cfg, steps, warmup, args.lr, args.rollout_precision)
                key = name if len(lengths) == 1 else f"{name}@{length}"
                results[key] = row
                print(f"{key}: {row['parameters'] / 1e6:.2f} M parameters, {length} new tokens, ours "
                      f"{row['ours_s']:.3f} s/step, TRL {row['trl_s']:.3f} s/step, ratio {row['ratio']:.3f}; "
                      f"mean completion tokens ours {row['ours_length']:.1f}, TRL {row['trl_length']:.1f}")
    print(json.dumps({"benchmark": "step_vs_trl", "quick": args.quick, "steps": steps, "warmup": warmup,
                      "prompts_per_step": cfg.prompts_per_step, "group_size": cfg.group_size,
                      "max_new_tokens": lengths, "lr": args.lr, "threads": torch.get_num_threads(),
                      "rollout_precision": args.rollout_precision,
                      **{f"{k}_{m}": v[k] for m, v in results.items()
                         for k in ("ours_s", "trl_s", "ratio", "ours_length", "trl_length")}}))


if __name__ == "__main__":
    main()
