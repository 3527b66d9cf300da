"""generate() on careless input (issue 11): one clear ValueError before any work, never an internal error."""
import pytest
import torch

from selfattn.models import generate
from selfattn.models.gpt2 import GPT2, GPT2Config
from selfattn.models.generation import sample_next


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()


@pytest.mark.parametrize("kw,match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "at least one prompt token"),
    (dict(input_ids=torch.tensor([[-1, 2]])), "token ids >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(eos_token_id=2 ** 64), "eos_token_id"),
    (dict(eos_token_id=-3), "eos_token_id"),
    (dict(eos_token_id=50), "beyond the model's vocabulary"),
    (dict(max_new_tokens=20), "exceed the model's 16 positions"),
    (dict(attention_mask=torch.tensor([[0, 1, 1]])), "padded prompts"),
    (dict(attention_mask=torch.ones(2, 3)), "attention_mask"),
])
def test_bad_generation_arguments(gpt, kw, match):
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(gpt, **args)


def test_tiny_temperature_samples_the_argmax(gpt):
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.999]])
    for t in (1e-45, 1e-300):
        assert int(sample_next(logits, temperature=t, generator=torch.Generator().manual_seed(0))) == 1
    out = generate(gpt, torch.tensor([[1, 2]]), 5, temperature=1e-45, attention_mask=torch.ones(1, 2))
    assert torch.equal(out, generate(gpt, torch.tensor([[1, 2]]), 5))  # = greedy
