
import torch

from smollm2.config import GenerateConfig, ModelConfig
from smollm2.data.tokenizer import EOS_ID, PAD_ID
from smollm2.model import SmolLM
from smollm2.serve.generate import filter_logits, generate, sample_next


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_keeps_exactly_k():
    logits = torch.log(torch.tensor([0.05, 0.30, 0.10, 0.40, 0.15]))
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_k=0)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.30, 0.10, 0.40, 0.15])  # sorted: 0.40 (3), 0.30 (1), 0.15 (4), 0.10 (2), 0.05 (0)
    logits = torch.log(probs)
    assert kept(filter_logits(logits, top_p=0.40)) == {3}  # 0.40 reaches 0.40
    assert kept(filter_logits(logits, top_p=0.41)) == {3, 1}
    assert kept(filter_logits(logits, top_p=0.70)) == {3, 1}
    assert kept(filter_logits(logits, top_p=0.71)) == {3, 1, 4}
    assert kept(filter_logits(logits, top_p=0.95)) == {3, 1, 4, 2}
    assert kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3, 4}
    assert kept(filter_logits(logits, top_p=0.01)) == {3}  # the top token always stays
    # both: top-k first, then top-p over what is left (renormalized)
    assert kept(filter_logits(logits, top_k=3, top_p=0.5)) == {3, 1}


def test_sampling_never_returns_pad_or_padding():
    logits = torch.full((4, 50304), -10.0)
    logits[:, PAD_ID] = 50.0  # the model "wants" pad
    logits[:, 50300] = 60.0  # and a storage-padding id
    logits[:, 7] = 0.0
    cfg = GenerateConfig(temperature=1.0, top_k=50, top_p=0.95)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = sample_next(logits, cfg, g)
        assert (ids < PAD_ID).all()
    assert (sample_next(logits, GenerateConfig(temperature=0.0)) == 7).all()


def test_temperature_to_zero_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(8, 50304)
    greedy = logits[:, :PAD_ID].argmax(-1)
    assert torch.equal(sample_next(logits, GenerateConfig(temperature=0.0, top_k=0, top_p=1.0)), greedy)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, GenerateConfig(temperature=1e-4, top_k=0, top_p=1.0), g), greedy)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(4000, 3)  # three ids, all below the pad id
    ids = sample_next(logits, GenerateConfig(temperature=1.0, top_k=0, top_p=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).float() / 4000
    assert abs(freq[0] - 0.7) < 0.03 and abs(freq[1] - 0.2) < 0.03 and abs(freq[2] - 0.1) < 0.03


def tiny_model():
    model = SmolLM(ModelConfig(n_layer=2, n_head=4, d_model=64, d_mlp=256, max_seq_len=64))
    model.init_weights(0)
    return model.eval()


def test_seed_reproducible_and_length_capped():
    model = tiny_model()
    cfg = GenerateConfig(max_new_tokens=12, seed=3, stop_at_eos=False)
    assert generate(model, [464], cfg) == generate(model, [464], cfg)
    assert len(generate(model, [464] * 60, cfg)) == 4  # capped by the context (64)


def test_stops_at_eos():
    model = tiny_model()
    with torch.no_grad():  # the final norm outputs a constant vector b, and the head row of EOS is 10*b: EOS wins
        model.norm.weight.zero_()
        model.norm.bias.normal_()
        model.embed.weight[EOS_ID] = 10 * model.norm.bias
    out = generate(model, [464], GenerateConfig(temperature=0.0, max_new_tokens=20))
    assert out == []
