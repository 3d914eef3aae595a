"""CoOp: prompt token layout and EOT index, the per-epoch learning rate, learning and determinism."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runs import run_method

from harness.backbones import encode_text
from harness.cards import get_card, suites
from harness.data.fewshot import manifest_for
from harness.runner import load_datasets
from methods import ImageSet, Task
from methods.coop import CoOp, PromptLearner, coop_lr, epochs_for_shots

SOS, EOT, X = 49406, 49407, 343  # CLIP BPE ids of <start_of_text>, <end_of_text>, "x</w>"


def make_task(backbone, dataset, shots, seed=1):
    splits = load_datasets([dataset], Path("."))[dataset]
    manifest = manifest_for(splits, shots, seed)
    size = backbone.image_size
    return Task(
        card=splits.card, classnames=[c.replace("_", " ") for c in splits.classnames], shots=shots, seed=seed,
        backbone=backbone, precision="fp32", train=ImageSet(splits.root, dataset, manifest.train, size),
        val=ImageSet(splits.root, dataset, manifest.val, size),
    )


@pytest.mark.parametrize("n_ctx", [16, 4])
def test_prompt_token_layout_and_eot_index(tiny, demo_root, n_ctx):
    task = make_task(tiny, "demo_shapes", 1)
    torch.manual_seed(0)
    prompts = PromptLearner(task, n_ctx, 0.02)
    tokens = prompts.tokens
    for c, name in enumerate(task.classnames):
        name_ids = tiny.tokenize([name])[0]
        name_ids = name_ids[1 : int(name_ids.argmax())].tolist()  # the class name's own tokens
        end = 1 + n_ctx + len(name_ids)
        assert tokens[c, 0] == SOS
        assert tokens[c, 1 : 1 + n_ctx].tolist() == [X] * n_ctx
        assert tokens[c, 1 + n_ctx : end].tolist() == name_ids  # class token at the end
        assert tokens[c, end + 1] == EOT  # after the full stop
        assert prompts.eot_index[c] == end + 1 == tokens[c].argmax()
    assert tokens.shape[1] == int(prompts.eot_index.max()) + 1  # truncated to the longest prompt
    emb = prompts.embeddings()
    assert emb.shape == (len(task.classnames), tokens.shape[1], tiny.model.token_embedding.weight.shape[1])
    assert torch.equal(emb[:, 1 : 1 + n_ctx], prompts.ctx.expand(len(task.classnames), -1, -1))
    assert prompts.ctx.std().item() == pytest.approx(0.02, rel=0.3)
    # With the context set to the embedding of "X", CoOp's text encoder is exactly CLIP's on the placeholder prompt.
    with torch.no_grad():
        prompts.ctx.copy_(tiny.model.token_embedding(torch.tensor([X] * n_ctx)))
        ours = prompts.text_features(task)
    placeholder = " ".join(["X"] * n_ctx)
    clip = F.normalize(encode_text(tiny.model, tiny.tokenize([f"{placeholder} {c}." for c in task.classnames])), dim=-1)
    torch.testing.assert_close(ours, clip, rtol=0, atol=1e-6)


def test_ctx_init_starts_from_the_words_embeddings(tiny, demo_root):
    """CoOp (4) as published: the context starts as the token embeddings of "a photo of a"."""
    task = make_task(tiny, "demo_shapes", 1)
    prompts = PromptLearner(task, 4, 0.02, "a photo of a")
    words = tiny.tokenize(["a photo of a"])[0, 1:5]
    torch.testing.assert_close(prompts.ctx, tiny.model.token_embedding(words).float(), rtol=0, atol=0)
    with torch.no_grad():  # untrained, the prompt is exactly CLIP's own "a photo of a {class}."
        ours = prompts.text_features(task)
    clip = F.normalize(encode_text(tiny.model, tiny.tokenize([f"a photo of a {c}." for c in task.classnames])), dim=-1)
    torch.testing.assert_close(ours, clip, rtol=0, atol=1e-6)
    assert CoOp.config_error({**CoOp.defaults, "ctx_init": "a photo of a"}, task.card).endswith("--set n_ctx=4.")
    assert CoOp.config_error({**CoOp.defaults, "ctx_init": "a photo of a", "n_ctx": 4}, task.card) is None


def test_learning_rate_per_epoch():
    max_epoch = 200
    assert coop_lr(1, max_epoch) == 1e-5  # constant warm-up, counts toward the total
    assert coop_lr(2, max_epoch) == pytest.approx(0.001 * (1 + math.cos(0)))  # = 0.002, the base lr
    assert coop_lr(3, max_epoch) == pytest.approx(0.001 * (1 + math.cos(math.pi / max_epoch)))
    assert coop_lr(max_epoch, max_epoch) == pytest.approx(0.001 * (1 + math.cos(math.pi * (max_epoch - 2) / max_epoch)))
    assert [epochs_for_shots(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert get_card("imagenet").recipe_for("coop") == {"epochs": 50}


def test_training_loop_uses_the_schedule_and_leaves_the_backbone_alone(random_tiny, demo_root):
    task = make_task(random_tiny, "demo_colours", 1)
    before = {k: v.clone() for k, v in random_tiny.model.state_dict().items()}
    method = CoOp(epochs=4, n_ctx=4)
    torch.manual_seed(0)
    method.fit(task)
    assert method.epoch_lrs == [coop_lr(e, 4) for e in (1, 2, 3, 4)]
    assert method.trainable_parameters() == 4 * random_tiny.model.token_embedding.weight.shape[1]
    after = random_tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in random_tiny.model.parameters())


def test_coop_learns_and_repeats(random_tiny, demo_root):
    zero_shot = run_method("zero_shot", "demo_colours", 0, random_tiny)["top1"]
    first = run_method("coop", "demo_colours", 16, random_tiny)
    second = run_method("coop", "demo_colours", 16, random_tiny)
    assert first["config"]["hparams"]["epoch_scale"] == suites()["demo"]["overrides"]["coop"]["epoch_scale"] < 1
    assert first["trainable_params"] == 16 * 64
    assert first["top1"] >= zero_shot + 8, (first["top1"], zero_shot)
    assert second["top1"] == first["top1"]
