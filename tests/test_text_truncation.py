"""The text tower on the prompt tokens only (harness.backbones.encode_text) gives the features of
open_clip's own encode_text on the full 77-token context: the causal mask means the tokens up to
EOT never see what follows them. Checked on the tiny and on the real ViT-B-16 architecture."""

import pytest
import torch

from harness.backbones import build_architecture, encode_text
from methods.lora import adapted_copy, lora_factory

PROMPTS = ["a photo of a cat.", "x", "a photo of a large red double-decker bus parked beside a very old stone bridge at dusk."]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("name", ["tiny", "ViT-B-16"])
@torch.no_grad()
def test_truncated_text_features_equal_open_clip(name):
    import open_clip

    torch.manual_seed(0)
    model = build_architecture(name).eval()
    tokens = open_clip.tokenize(PROMPTS)
    eot = tokens.argmax(-1)
    assert int(eot.max()) + 1 < tokens.shape[1]  # the prompts really are truncated
    close(encode_text(model, tokens), model.encode_text(tokens))


@torch.no_grad()
def test_truncation_exact_through_adapted_attention():
    """Also through the LoRA attention (SDPA, sliced causal mask) with a non-zero update."""
    import open_clip

    torch.manual_seed(0)
    model, params = adapted_copy(build_architecture("tiny"), lora_factory(), ("text",))
    for p in params:
        p.normal_(std=0.5)
    model.eval()
    tokens = open_clip.tokenize(PROMPTS)
    close(encode_text(model, tokens), model.encode_text(tokens))
