"""The Hugging Face model (checkpoints/hf/modeling_sessa.py) on padded batches: each padded row
gives what its prompt gives alone (logits and greedy generation), left or right padding."""
import pytest
import torch

from checkpoints.hf.configuration_sessa import ModelConfig as HFConfig
from checkpoints.hf.modeling_sessa import SessaForCausalLM

LENGTHS = [3, 12, 1, 7]  # chunk size 4: prompts straddle chunk boundaries


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = HFConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, feedback_chunk_size=4, pad_token_id=0, eos_token_id=None,
                      initializer_range=0.25)  # large weights: greedy tokens depend on the whole context
    return SessaForCausalLM(config).eval()


def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 53, (n,), generator=gen) for n in LENGTHS]


def padded(rows, side: str):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_equal_each_prompt_alone(model, side):
    rows = prompts()
    ids, mask = padded(rows, side)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            torch.testing.assert_close(batch[i][mask[i].bool()], alone, atol=1e-5, rtol=1e-5)


def test_all_ones_mask_is_the_unpadded_model(model):
    ids = prompts()[1][None]
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)


def test_greedy_generate_on_a_padded_batch_equals_per_prompt_generate(model):
    rows = prompts()
    ids, mask = padded(rows, "left")
    new = 6
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert torch.equal(batch[i, -new:], alone[0, -new:]), i


def test_mask_of_the_wrong_length_is_refused(model):
    ids, mask = padded(prompts(), "left")
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=mask[:, 1:])
