"""The LoRA / Block-LoRA layers (methods/lora.py): exactness at start, merge, n = 1, gradients, counts."""

import copy

import pytest
import torch
import torch.nn as nn

from harness.backbones import build_architecture, encode_text
from methods.lora import (
    AdaptedAttention,
    BlockLoRAAdapter,
    LoRAAdapter,
    adapted_copy,
    adapted_modules,
    add_adapters,
    block_lora_factory,
    lora_factory,
    merge_adapters,
    unmerge_adapters,
)

FACTORIES = {"lora": lambda: lora_factory(), "block_lora": lambda: block_lora_factory(n=8)}


def causal_mask(n: int) -> torch.Tensor:
    """open_clip's text mask: additive float, -inf above the diagonal."""
    return torch.empty(n, n).fill_(float("-inf")).triu_(1)


def randomize_B(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapted_modules(model):
            for ad in m.adapters.values():
                ad.B.copy_(torch.randn(ad.B.shape, generator=g) * 0.5)


def outputs(model, images, tokens):
    return model.encode_image(images), encode_text(model, tokens), model.encode_text(tokens)


@pytest.fixture(scope="module")
def inputs(tiny):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    tokens = tiny.tokenize(["a photo of a circle.", "a star.", "a photo of a big red square on grey."])
    return images, tokens


@pytest.mark.parametrize("mask", [None, "causal"])
@pytest.mark.parametrize("targets", [(), ("q", "k", "v")])
def test_sdpa_attention_equals_multihead_attention(mask, targets):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 7, 64)
    m = causal_mask(7) if mask else None
    ref = mha(x, x, x, need_weights=False, attn_mask=m)[0]
    ours, weights = AdaptedAttention(copy.deepcopy(mha), lora_factory(), targets)(x, x, x, need_weights=False, attn_mask=m)
    assert weights is None
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # cross-attention path (separate q / k / v inputs) too
    y = torch.randn(3, 5, 64)
    ref = mha(x, y, y, need_weights=False)[0]
    torch.testing.assert_close(AdaptedAttention(copy.deepcopy(mha), lora_factory(), targets)(x, y, y)[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", FACTORIES)
def test_wrapped_model_equals_original_at_init(tiny, inputs, kind):
    model, params = adapted_copy(tiny.model, FACTORIES[kind]())
    assert len(adapted_modules(model)) == 4 and params
    ref = outputs(tiny.model, *inputs)
    for train in (False, True):  # B = 0: the branch is zero whatever dropout draws
        model.train(train)
        for got, want in zip(outputs(model, *inputs), ref):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(isinstance(b.attn, nn.MultiheadAttention) for b in tiny.model.transformer.resblocks)  # original untouched


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("targets", [("q", "k", "v"), ("q", "k", "v", "o")])
def test_merged_equals_factored_after_random_B(tiny, inputs, kind, targets):
    model, _ = adapted_copy(tiny.model, FACTORIES[kind](), targets=targets)
    randomize_B(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factored = outputs(model, *inputs)
    assert not torch.allclose(factored[0], tiny.model.encode_image(inputs[0]), atol=1e-3)  # the adapters do act
    merge_adapters(model)
    merge_adapters(model)  # idempotent
    for got, want in zip(outputs(model, *inputs), factored):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    unmerge_adapters(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)


def test_merged_model_refuses_to_train(tiny, inputs):
    model, _ = adapted_copy(tiny.model, lora_factory())
    merge_adapters(model)
    model.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.encode_image(inputs[0])


def test_block_lora_n1_equals_lora():
    torch.manual_seed(0)
    lora, block = LoRAAdapter(48, 40), BlockLoRAAdapter(48, 40, n=1)
    with torch.no_grad():
        lora.B.normal_()
        block.A.copy_(lora.A)
        block.B.copy_(lora.B)
    x = torch.randn(5, 7, 48)
    torch.testing.assert_close(block.delta_weight(), lora.delta_weight(), atol=0, rtol=0)
    for train in (False, True):  # same dropout draws from the same seed
        lora.train(train), block.train(train)
        torch.manual_seed(1)
        a = lora(x)
        torch.manual_seed(1)
        torch.testing.assert_close(block(x), a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_norm", ["none", "n", "sqrt_n"])
@pytest.mark.parametrize("n", [2, 8])
def test_block_lora_factored_equals_block_matrix(n, chunk_norm):
    """s * B A_s (x_1 + ... + x_n) == x (s * B [A_s, ..., A_s] / norm)^T, and parameters r (d_out + d_in / n)."""
    torch.manual_seed(0)
    block = BlockLoRAAdapter(64, 32, r=2, n=n, chunk_norm=chunk_norm).eval()
    with torch.no_grad():
        block.B.normal_()
    x = torch.randn(6, 64)
    torch.testing.assert_close(block(x), x @ block.delta_weight().T, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in block.parameters()) == 2 * (32 + 64 // n)
    with torch.no_grad():  # the merged matrix is n copies of A_s side by side
        chunks = (block.delta_weight() / block.scaling).chunk(n, dim=1)
    for c in chunks[1:]:
        torch.testing.assert_close(c, chunks[0])


def test_block_lora_n_must_divide_width():
    with pytest.raises(ValueError, match="divisor of the input width 64"):
        BlockLoRAAdapter(64, 64, n=7)


def test_only_adapter_parameters_get_gradients(tiny, inputs):
    model, params = adapted_copy(tiny.model, block_lora_factory(n=8))
    randomize_B(model)
    model.train()
    images, tokens = inputs
    loss = (model.encode_image(images) @ encode_text(model, tokens).T).square().mean()
    loss.backward()
    ids = {id(p) for p in params}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert all(id(p) in ids for p in model.parameters() if p.requires_grad)
    assert set(with_grad) == set(trainable) and len(trainable) == len(params) == 4 * 3 * 2
    assert all(".adapters." in n for n in trainable)
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())


# Parameter counts of ../shared/METHODS.md on the real architectures (random weights).
EXPECTED = {
    "ViT-B-16": {"lora": (110_592, 73_728), "block_lora": 103_680},
    "ViT-L-14": {"lora": (294_912, 110_592), "block_lora": 228_096},
}


@pytest.mark.parametrize("arch", EXPECTED)
def test_trainable_parameter_counts_on_real_architectures(arch):
    base = build_architecture(arch)
    vision, text = EXPECTED[arch]["lora"]
    model, params = adapted_copy(base, lora_factory())
    assert sum(p.numel() for p in params) == vision + text  # 184,320 / 405,504
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == vision + text
    assert sum(p.numel() for p in model.visual.parameters() if p.requires_grad) == vision
    del model
    params = add_adapters(base, block_lora_factory(n=8))  # in place: `base` is this test's own
    assert sum(p.numel() for p in params) == EXPECTED[arch]["block_lora"]  # 103,680 / 228,096
    assert sum(p.numel() for p in base.parameters() if p.requires_grad) == EXPECTED[arch]["block_lora"]
