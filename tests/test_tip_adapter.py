"""Tip-Adapter(-F): logit formula, alpha/beta search grid, cache keys, learning and determinism."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runs import run_method

import methods.tip_adapter as tip
from harness.data.fewshot import manifest_for
from harness.runner import load_datasets
from methods import ImageSet, Task


def test_logit_formula_on_hand_made_features():
    s = 1 / math.sqrt(2)
    f = torch.tensor([[1.0, 0.0], [s, s]])  # two normalised test features
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two classes
    K = torch.tensor([[1.0, 0.0], [0.0, 1.0], [s, s]])  # three cached images
    L = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # their one-hot labels
    alpha, beta = 2.0, 3.0
    e = lambda cos: math.exp(-beta * (1 - cos))  # noqa: E731
    expected = torch.tensor([
        [100 * 1 + alpha * e(1), 100 * 0 + alpha * (e(0) + e(s))],
        [100 * s + alpha * e(s), 100 * s + alpha * (e(s) + e(1))],
    ])
    torch.testing.assert_close(tip.tip_logits(f, W, K, L, alpha, beta), expected)
    # alpha = 0 is zero-shot CLIP with logit scale 100
    torch.testing.assert_close(tip.tip_logits(f, W, K, L, 0.0, beta), 100 * f @ W.T)


def test_search_grid_never_reaches_its_bounds():
    betas, alphas = tip.search_grid([7, 3])
    assert len(betas) == 200 and len(alphas) == 20
    assert betas[0] == pytest.approx(0.1) and alphas[0] == pytest.approx(0.1)
    assert betas[-1] == pytest.approx(0.1 + 199 * 6.9 / 200) and betas[-1] < 7
    assert alphas[-1] == pytest.approx(0.1 + 19 * 2.9 / 20) and alphas[-1] < 3
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:]))


def reference_search(clip_logits, affinity, values, labels, scale):
    """The official nested loop: beta outer, alpha inner, a later pair must be strictly better."""
    betas, alphas = tip.search_grid(scale)
    best = (-1.0, None, None)
    for beta in betas:
        for alpha in alphas:
            logits = clip_logits + alpha * torch.exp(-beta * (1 - affinity)) @ values
            acc = 100.0 * (logits.argmax(-1) == labels).sum().item() / len(labels)
            if acc > best[0]:
                best = (acc, beta, alpha)
    return best[1], best[2], best[0]


def test_search_keeps_the_first_best_and_matches_the_official_loop():
    # Every pair ties when the cache cannot change the prediction: the first pair wins.
    clip_logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    affinity, values = torch.zeros(2, 2), torch.eye(2)
    assert tip.search_alpha_beta(clip_logits, affinity, values, torch.tensor([0, 0]), [7, 3]) == (0.1, 0.1, 50.0)
    # A random problem with few val images (many ties), in chunks or at once: same pair as the loop.
    gen = torch.Generator().manual_seed(0)
    n, nk, c = 12, 16, 4
    clip_logits = 3 * torch.randn(n, c, generator=gen)
    affinity = torch.rand(n, nk, generator=gen)
    values = F.one_hot(torch.arange(nk) % c, c).float()
    labels = torch.randint(0, c, (n,), generator=gen)
    expected = reference_search(clip_logits, affinity, values, labels, [12, 10])
    assert expected[:2] != (0.1, 0.1)  # a problem where the search has something to find
    for max_elements in (1 << 26, 1000):
        beta, alpha, acc = tip.search_alpha_beta(clip_logits, affinity, values, labels, [12, 10], max_elements=max_elements)
        assert (beta, alpha) == expected[:2] and acc == pytest.approx(expected[2])


def test_keys_are_averaged_over_views_before_normalisation(random_tiny, demo_root, monkeypatch):
    views = torch.tensor([[[10.0, 0.0]], [[0.0, 1.0]]])  # one image, two views with very different norms
    torch.testing.assert_close(tip.average_views(views), F.normalize(torch.tensor([[5.0, 0.5]]), dim=-1))
    assert not torch.allclose(tip.average_views(views), F.normalize(F.normalize(views, dim=-1).mean(0), dim=-1))
    # The method builds its keys that way from `augment_views` fresh views of each training image.
    splits = load_datasets(["demo_colours"], Path("."))["demo_colours"]
    manifest = manifest_for(splits, 2, 1)
    size = random_tiny.image_size
    task = Task(
        card=splits.card, classnames=splits.classnames, shots=2, seed=1, backbone=random_tiny, precision="fp32",
        train=ImageSet(splits.root, "demo_colours", manifest.train, size),
        val=ImageSet(splits.root, "demo_colours", manifest.val, size),
    )
    drawn = []

    def fake_views(task, images, scale, batch_size=256):
        assert scale == (0.5, 1.0)
        drawn.append(torch.randn(len(images), 64) * (1 + 10 * len(drawn)))
        return drawn[-1]

    monkeypatch.setattr(tip, "augmented_features", fake_views)
    method = tip.TipAdapter(augment_views=3, search=False)
    method.fit(task)
    assert len(drawn) == 3
    torch.testing.assert_close(method.keys, F.normalize(torch.stack(drawn).mean(0), dim=-1))
    torch.testing.assert_close(method.values, F.one_hot(task.train.labels, 8).float())
    assert (method.alpha, method.beta) == (1.17, 1.0)  # the card's initial values without search


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_learns_and_repeats(random_tiny, demo_root, name):
    zero_shot = run_method("zero_shot", "demo_colours", 0, random_tiny)["top1"]
    first = run_method(name, "demo_colours", 16, random_tiny)
    second = run_method(name, "demo_colours", 16, random_tiny)
    assert first["trainable_params"] == (0 if name == "tip_adapter" else 8 * 16 * 64)  # N*K*D keys
    assert first["top1"] >= zero_shot + 8, (first["top1"], zero_shot)
    assert second["top1"] == first["top1"]


def test_search_split_full_val_searches_the_whole_val_split(random_tiny, demo_root):
    """A case built for it: the full val split is the few-shot val with every label shifted by one
    class, so the cache that helps on the few-shot val hurts there and the search must choose otherwise."""
    from harness.cards import get_card
    from harness.data.readers import Item

    splits = load_datasets(["demo_colours"], Path("."))["demo_colours"]
    manifest = manifest_for(splits, 4, 1)
    size, n = random_tiny.image_size, len(splits.classnames)
    shifted = [Item(it.path, (it.label + 1) % n, splits.classnames[(it.label + 1) % n]) for it in manifest.val]
    chosen = {}
    for split in ("fewshot_val", "full_val"):
        task = Task(
            card=splits.card, classnames=splits.classnames, shots=4, seed=1, backbone=random_tiny, precision="fp32",
            train=ImageSet(splits.root, "demo_colours", manifest.train, size),
            val=ImageSet(splits.root, "demo_colours", manifest.val, size),
            full_val=ImageSet(splits.root, "demo_colours", shifted, size),
        )
        torch.manual_seed(0)
        method = tip.TipAdapter(augment_views=1, search_split=split)
        method.fit(task)
        chosen[split] = (method.alpha, method.beta, method.val_accuracy)
    assert chosen["fewshot_val"][:2] != chosen["full_val"][:2], chosen
    assert chosen["fewshot_val"][2] > chosen["full_val"][2]
    # ImageNet has no val split: full_val is refused before any run instead of searching on test.
    assert "never" in tip.TipAdapter.config_error({"search_split": "full_val"}, get_card("imagenet"))
    assert tip.TipAdapter.config_error({"search_split": "full_val"}, get_card("dtd")) is None
