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
    (dict(attention_mask=torch.ones(2, 3)), "attention_mask"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), "no real token"),
    (dict(attention_mask=torch.tensor([[2, 1, 1]])), "1 \\(real token\\) or 0"),
    (dict(attention_mask=torch.tensor([[0.5, 1.0, 1.0]])), "1 \\(real token\\) or 0"),
    (dict(attention_mask=torch.tensor([[float("nan"), 1.0, 1.0]])), "1 \\(real token\\) or 0"),
    (dict(attention_mask=[[1, 1, 1]]), "attention_mask"),
    # 3 real tokens + 14 new would need positions up to 16: the padding takes none, the real tokens do
    (dict(input_ids=torch.tensor([[0, 1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1, 1]]), max_new_tokens=14),
     "prompt \\(3 tokens\\) plus 14"),
])
def test_bad_generation_arguments(gpt, kw, match):
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(gpt, **args)


def test_padded_prompt_generates_what_it_generates_alone(gpt):
    # the case that used to be refused: padding is masked and positions start at the first real token
    out = generate(gpt, torch.tensor([[0, 1, 2, 3]]), 4, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    assert torch.equal(out[:, 4:], generate(gpt, torch.tensor([[1, 2, 3]]), 4)[:, 3:])
    # 3 real tokens + 13 new fit GPT-2's 16 positions although the padded row is 4 wide
    assert generate(gpt, torch.tensor([[0, 1, 2, 3]]), 13, attention_mask=torch.tensor([[0, 1, 1, 1]])).shape == (1, 17)


def test_model_without_padding_support_refuses_a_padded_batch():
    class Plain:  # a Generative from before attention_mask: start_generation has three parameters
        def start_generation(self, input_ids, max_len, use_cache):
            return input_ids, None

        def generation_step(self, tokens, state):
            return torch.zeros(tokens.shape[0], 1, 5)
    ones = torch.ones(1, 2, dtype=torch.long)  # nothing padded: the three-argument call still serves
    assert generate(Plain(), torch.tensor([[1, 2]]), 2, attention_mask=ones).shape == (1, 4)
    with pytest.raises(ValueError, match="takes no attention_mask"):
        generate(Plain(), torch.tensor([[1, 2]]), 2, attention_mask=torch.tensor([[0, 1]]))


def test_tiny_temperature_samples_the_argmax(gpt):
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.999]])
    for t in (1e-45, 1e-300):
        assert int(sample_next(logits, temperature=t, generator=torch.Generator().manual_seed(0))) == 1
    out = generate(gpt, torch.tensor([[1, 2]]), 5, temperature=1e-45, attention_mask=torch.ones(1, 2))
    assert torch.equal(out, generate(gpt, torch.tensor([[1, 2]]), 5))  # = greedy
