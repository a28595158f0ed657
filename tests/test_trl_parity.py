"""Our GRPO loss equals TRL's GRPOTrainer loss on identical inputs (TRL is a test dependency)."""

import pytest
import torch

from fgrpo.grpo import grpo_loss
from fgrpo.model import build_tiny_model, char_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

N, G, C = 8, 4, 6  # completions, group size, completion length


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny model folder (TRL loads its reference model from the path when beta > 0)."""
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = char_tokenizer()
    build_tiny_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def trl_trainer(tiny, tmp_path, loss_type, beta, mu, kl_bias_correction):
    model, tokenizer = tiny
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), loss_type=loss_type, beta=beta, num_iterations=mu, epsilon=0.2,
        epsilon_high=0.28, per_device_train_batch_size=N, num_generations=G, max_completion_length=C,
        report_to=[], use_cpu=True, bf16=False, logging_steps=1,
        use_bias_correction_kl=kl_bias_correction)
    train = datasets.Dataset.from_dict({"prompt": ["ab"] * N})
    return trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                           args=args, train_dataset=train, processing_class=tokenizer)


CASES = [(loss_type, beta, mu, correction)
         for loss_type in ("grpo", "dapo", "dr_grpo") for mu in (1, 2)
         for beta, correction in ((0.0, False), (0.04, False), (0.04, True))]


@pytest.mark.parametrize("loss_type, beta, mu, kl_bias_correction", CASES)
def test_loss_matches_trl(tiny, tmp_path, loss_type, beta, mu, kl_bias_correction):
    gen = torch.Generator().manual_seed(hash((loss_type, beta, mu)) % 2**31)
    logps = -torch.rand(N, C, generator=gen, dtype=torch.float64) * 3  # [N, C]
    old = logps + 0.3 * torch.randn(N, C, generator=gen, dtype=torch.float64)  # ratios beyond the clip
    ref = logps + 0.5 * torch.randn(N, C, generator=gen, dtype=torch.float64)
    advantages = torch.randn(N, generator=gen, dtype=torch.float64)
    mask = torch.ones(N, C, dtype=torch.long)
    for i in range(N):  # ragged completions
        mask[i, 1 + i % (C - 1):] = 0
    old_logps = old if mu > 1 else None  # mu = 1: pi_old is the detached current policy

    trainer = trl_trainer(tiny, tmp_path, loss_type, beta, mu, kl_bias_correction)
    trainer.model.eval()  # no gradient-accumulation normalizer
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    inputs = {
        "prompt_ids": torch.ones(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
        "completion_ids": torch.ones(N, C, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "num_items_in_batch": mask.sum(),
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if beta:
        inputs["ref_per_token_logps"] = ref
    expected = trainer._compute_loss(trainer.model, inputs)

    ours, _ = grpo_loss(logps, old_logps, ref if beta else None, advantages, mask, loss_type, beta,
                        epsilon_low=0.2, epsilon_high=0.28, max_completion_length=C,
                        kl_bias_correction=kl_bias_correction)
    assert abs(ours.item() - expected.item()) < 1e-6
    if mu > 1:  # the clip is active in this test, so it is really compared
        assert not torch.allclose(torch.exp(logps - old), torch.exp(logps - old).clamp(0.8, 1.28))
