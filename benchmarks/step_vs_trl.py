"""One local GRPO step, ours vs TRL's GRPOTrainer, on the same work, interleaved in one process.

A step is: sample B prompts x G completions (KV-cached ``generate``), score them with the same
verifier, group advantages, the GRPO loss, backward, gradient clipping and one AdamW step on the
LoRA parameters. Both sides get the same base model, the same LoRA adapter config (rank 16 on
every linear layer, no dropout), the same prompts, B, G, max completion length, temperature,
loss type ("grpo"), beta (0), mu (1), epsilon, learning rate and max grad norm, fp32 on the CPU.
TRL runs with ``gradient_checkpointing=False`` (its default is True, which would only slow it
down here) and no logging of completions.

The two are interleaved: a TRL ``TrainerCallback`` times each TRL step (on_step_begin ->
on_step_end) and then runs and times one of ours, so both see the same machine state. The
first ``--warmup`` pairs are dropped; the median of the rest is reported.

Models: the embedded default (0.87 M parameters) and a 24 M-parameter Llama built from a config
(hidden 512, 7 layers, random weights: it always writes the full completion length, which is
the same work for both sides).

    python benchmarks/step_vs_trl.py --quick     # 5 timed pairs per model after 1 warm-up
    python benchmarks/step_vs_trl.py             # 15 timed pairs per model after 2 warm-up
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
from fgrpo.model import add_lora, char_tokenizer, embedded_model_path, load_base
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


def compare(path: str, cfg: RunConfig, steps: int, warmup: int) -> dict:
    """Median seconds per step of ours and of TRL's, interleaved; returns one result row."""
    import trl

    examples = [e for t in tasks.DEFAULT_TASKS for e in tasks.train_split(t, 64, seed=0)]
    by_prompt = {e.prompt: e for e in examples}

    def trl_reward(prompts, completions, **_):
        return [tasks.correctness(by_prompt[p], c) for p, c in zip(prompts, completions)]

    # ours: the same code path a client runs (fgrpo.grpo.local_grpo), one step per call
    base, tokenizer = load_base(path, torch.device("cpu"))
    parameters = sum(p.numel() for p in base.parameters())
    model = add_lora(base, cfg.lora_r, cfg.lora_alpha, 0.0, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    settings = GRPOSettings.from_config(cfg, local_steps=1)
    order = torch.Generator().manual_seed(1)

    def our_batches():
        while True:
            idx = torch.randperm(len(examples), generator=order)[:cfg.prompts_per_step].tolist()
            yield [examples[i] for i in idx]

    batches = our_batches()
    times: dict[str, list[float]] = {"ours": [], "trl": []}

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["trl"].append(time.perf_counter() - self.start)
            start = time.perf_counter()
            local_grpo(model, tokenizer, optimizer, batches, tasks.correctness, settings)
            times["ours"].append(time.perf_counter() - start)

    n = cfg.prompts_per_step * cfg.group_size
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, loss_type="grpo", beta=0.0, num_iterations=1,
        epsilon=0.2, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, max_steps=steps + warmup,
        gradient_checkpointing=False, use_cpu=True, bf16=False, report_to=[], logging_steps=10_000,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    train = Dataset.from_dict({"prompt": [e.prompt for e in examples]})
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trl_tokenizer = load_base(path, torch.device("cpu"))[1]
    trainer = trl.GRPOTrainer(model=path, reward_funcs=trl_reward, args=args, train_dataset=train,
                              processing_class=trl_tokenizer, peft_config=peft_config, callbacks=[Interleave()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    ours, theirs = statistics.median(times["ours"][warmup:]), statistics.median(times["trl"][warmup:])
    return {"parameters": parameters, "ours_s": ours, "trl_s": theirs,
            "ratio": ours / theirs, "steps": len(times["ours"][warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quiet_libraries()
    cfg = RunConfig()
    steps, warmup = (5, 1) if args.quick else (15, 2)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = {"embedded": str(embedded_model_path(cfg.warm_start_steps, cfg.cache_dir)),
                 "24M": large_model_path(folder)}
        for name, path in paths.items():
            row = compare(path, cfg, steps, warmup)
            results[name] = row
            print(f"{name}: {row['parameters'] / 1e6:.2f} M parameters, ours {row['ours_s']:.3f} s/step, "
                  f"TRL {row['trl_s']:.3f} s/step, ratio {row['ratio']:.3f}")
    print(json.dumps({"benchmark": "step_vs_trl", "quick": args.quick, "steps": steps, "warmup": warmup,
                      "prompts_per_step": cfg.prompts_per_step, "group_size": cfg.group_size,
                      "max_new_tokens": cfg.max_new_tokens, "threads": torch.get_num_threads(),
                      **{f"{k}_{m}": v[k] for m, v in results.items() for k in ("ours_s", "trl_s", "ratio")}}))


if __name__ == "__main__":
    main()
