"""One local GRPO step with a deliberately slow verifier, with 1 and with 4 reward workers.

The verifier sleeps ``--delay`` seconds (0.2) per sample, as a verifier service or a sandbox would
keep it waiting, then checks the answer exactly. A step is what a client runs (``fgrpo.grpo.local_grpo``
on its ``GuardedReward``, with the accuracy it logs): 8 prompts x 8 completions = 64 samples on the
tiny embedded model, fp32 on the CPU. Sequential scoring alone would take 64 x 0.2 = 12.8 s; with
``reward_workers = N`` the samples are scored on N threads, one call per sample. The reference row is
the same step with an instant verifier (what the step costs without the verifier's wait). Each row also
gives the part of the step spent scoring (``GuardedReward.score_batch``), which depends on the verifier's
wait and the workers alone, not on how busy the CPU is; torch runs on one thread (``--threads``), so the
compute part suffers less from other processes on the machine.

    python benchmarks/reward_workers.py            # 2 steps per setting after a warm-up, the median reported
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from fgrpo import tasks
from fgrpo.config import RunConfig
from fgrpo.grpo import GRPOSettings, local_grpo, prompt_batches
from fgrpo.model import add_lora, load_base
from fgrpo.rewards import GuardedReward, OwnerReward
from fgrpo.runner import quiet_libraries


def slow_verifier(delay: float):
    def verifier(prompt: str, completion: str, answer: str) -> float:
        time.sleep(delay)
        return float(completion.strip() == answer.strip())
    return verifier


class TimedReward(GuardedReward):
    """A client's reward that adds up the seconds it spends scoring batches."""

    scoring = 0.0

    def score_batch(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().score_batch(*args, **kwargs)
        finally:
            self.scoring += time.perf_counter() - start


def step_seconds(model, tokenizer, settings: GRPOSettings, delay: float, workers: int, steps: int
                 ) -> tuple[float, float]:
    """Median seconds of one local step and of its scoring (a fresh optimizer, the same prompts each setting)."""
    reward = TimedReward(OwnerReward("slow", slow_verifier(delay)))
    owner_rows = tasks.train_split("spell_backward", 64, seed=0)
    examples = owner_rows
    params = [p for p in model.parameters() if p.requires_grad]
    times, scoring = [], []
    for step in range(steps):
        reward.begin_round(step + 1, workers, timeout=60.0)
        reward.scoring = 0.0
        optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: every step is the same work
        torch.manual_seed(step)
        start = time.perf_counter()
        local_grpo(model, tokenizer, optimizer, prompt_batches(examples, settings.prompts_per_step, step), reward,
                   settings)
        times.append(time.perf_counter() - start)
        scoring.append(reward.scoring)
        assert reward.take_failures()[0] == 0
    return statistics.median(times), statistics.median(scoring)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the verifier takes per sample")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (median reported)")
    parser.add_argument("--warm-start-steps", type=int, default=300)
    parser.add_argument("--cache-dir", default=str(tempfile.gettempdir() + "/fgrpo-tests-cache"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    cfg = RunConfig(prompts_per_step=8, group_size=8, max_new_tokens=8, warm_start_steps=args.warm_start_steps,
                    cache_dir=args.cache_dir)
    base, tokenizer = load_base("embedded", torch.device("cpu"), cfg.warm_start_steps, cfg.cache_dir)
    model = add_lora(base, cfg.lora_r, cfg.lora_alpha, 0.0, seed=0)
    settings = GRPOSettings.from_config(cfg, local_steps=1)
    samples = cfg.prompts_per_step * cfg.group_size
    rows = [("instant verifier, no workers", 0.0, 0), (f"{args.delay:g} s verifier, 1 worker", args.delay, 1),
            (f"{args.delay:g} s verifier, 4 workers", args.delay, 4)]
    seconds = {}
    print(f"one local step: {cfg.prompts_per_step} prompts x {cfg.group_size} completions = {samples} samples, "
          f"max_new_tokens {cfg.max_new_tokens}, torch threads {torch.get_num_threads()}")
    step_seconds(model, tokenizer, settings, 0.0, 0, 1)  # warm-up, not reported
    for label, delay, workers in rows:
        seconds[label] = step_seconds(model, tokenizer, settings, delay, workers, args.steps)
        print(f"  {label:<32} step {seconds[label][0]:6.2f} s   of which scoring {seconds[label][1]:6.2f} s")
    (one, one_scoring), (four, four_scoring) = seconds[rows[1][0]], seconds[rows[2][0]]
    print(f"1 worker / 4 workers: step {one / four:.2f}x, scoring {one_scoring / four_scoring:.2f}x "
          f"(the verifier's wait alone, sequential: {samples * args.delay:.1f} s)")


if __name__ == "__main__":
    main()
