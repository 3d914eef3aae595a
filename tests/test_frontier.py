"""The 2025 frontier methods (GDA, ProLIP, CLIP-SVD, 2SFS): each mechanism pinned against an
independent computation, parameter counts on the real ViT-B/16 architecture, and demo runs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from runs import eval_images, run_method
from test_linear_probes import make_task

from harness.backbones import build_architecture
from harness.cards import get_card
from methods import REGISTRY
from methods.gda import ALPHAS, gaussian_classifier
from methods.prolip import prolip_logits, prolip_loss

DEMO = ("demo_colours", "demo_shapes", "demo_textures")


def test_gda_classifier_is_the_closed_form_with_the_ks_estimator():
    """W = P mu^T and b = log(1/C) - mu P mu^T / 2 with P = d pinv((n-1) S + tr(S) I), computed
    here with numpy from the formula in the paper's code."""
    gen = torch.Generator().manual_seed(0)
    c, d, per = 3, 6, 5
    labels = torch.arange(c).repeat_interleave(per)
    feats = F.normalize(torch.randn(c * per, d, generator=gen) + 2 * torch.eye(c, d)[labels], dim=-1)
    weights, bias = gaussian_classifier(feats, labels, c)
    x, y = feats.double().numpy(), labels.numpy()
    mu = np.stack([x[y == k].mean(0) for k in range(c)])
    centred = x - mu[y]
    s = centred.T @ centred / (len(x) - 1)
    p = d * np.linalg.pinv((len(x) - 1) * s + np.trace(s) * np.eye(d))
    np.testing.assert_allclose(weights.double().numpy(), p @ mu.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bias.double().numpy(), np.log(1 / c) - 0.5 * np.einsum("cd,de,ce->c", mu, p, mu), rtol=1e-4, atol=1e-4)
    assert ALPHAS == [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]


def test_gda_searches_alpha_on_the_few_shot_val_and_is_class_specific(random_tiny, demo_root):
    task = make_task(random_tiny, shots=4)
    method = REGISTRY["gda"](augment_views=2)
    method.fit(task)
    assert method.alpha in ALPHAS and method.selection() == "few-shot val search over 7 alphas"
    fixed = REGISTRY["gda"](augment_views=2, alpha=10.0)
    fixed.fit(task)
    assert fixed.alpha == 10.0 and fixed.selection() == "fixed recipe"
    assert not REGISTRY["gda"].open_vocabulary  # one Gaussian per training class
    assert "test set" in REGISTRY["gda"].config_error({"search_split": "full_val", "alpha": None}, get_card("imagenet"))


def test_prolip_starts_at_clip_and_its_regulariser_is_zero_there(random_tiny, demo_root):
    task = make_task(random_tiny, shots=4)
    w0 = random_tiny.model.visual.proj.detach().float()
    test = eval_images(task)
    text = task.text_classifier(task.card.ensemble)
    pre = task.frozen_features(test, pre_projection=True)
    # x W0, normalised, is CLIP's own image feature: at init ProLIP is zero-shot CLIP
    torch.testing.assert_close(prolip_logits(pre, w0, text), 100.0 * task.frozen_features(test) @ text.T, rtol=0, atol=1e-4)
    labels = test.labels
    ce = F.cross_entropy(prolip_logits(pre, w0, text), labels)
    torch.testing.assert_close(prolip_loss(pre, labels, w0, w0, text, 0.25), ce)  # ||W - W0||^2 = 0 at init
    moved = w0 + 0.1
    assert prolip_loss(pre, labels, moved, w0, text, 0.25) - F.cross_entropy(prolip_logits(pre, moved, text), labels) == pytest.approx(
        0.25 * 0.01 * w0.numel(), rel=1e-4)  # lambda times the summed squares
    method = REGISTRY["prolip"](iterations=2, augment_views=2)
    method.fit(task)
    assert method.lam == 1 / 4 and method.trainable_parameters() == w0.numel()  # lambda = 1/N, N the shots
    assert REGISTRY["prolip"].open_vocabulary


def test_prolip_trains_the_visual_projection_of_vit_b16():
    model = build_architecture("ViT-B-16")
    assert model.visual.proj.numel() == 393_216  # 768 x 512, as the paper counts


@pytest.mark.parametrize("method", ["gda", "prolip"])
def test_frontier_methods_beat_zero_shot_on_the_demo_at_16_shots(tiny, demo_root, method):
    ours = [run_method(method, d, 16, tiny) for d in DEMO]
    zero = [run_method("zero_shot", d, 0, tiny) for d in DEMO]
    assert all(r["status"] == "ok" for r in ours), [r.get("error") for r in ours]
    assert sum(r["top1"] for r in ours) / 3 >= sum(r["top1"] for r in zero) / 3 + 5
