"""The base-to-new frontier (PromptSRC, MMRL) and one recipe across protocols (`--recipe`): each
mechanism pinned against an independent computation, parameter counts on the real ViT-B/16
architecture, and demo runs under the protocols."""

import dataclasses
import math

import duckdb
import pytest
import torch
import torch.nn.functional as F
from runs import block_inputs, eval_images
from test_coop import make_task

from harness.backbones import Backbone, build_architecture, encode_text
from harness.cli import run_cli
from harness.data.images import normalize
from harness.grid import build_grid, resolve_hparams
from harness.published import display_name
from methods import REGISTRY, promptsrc
from methods.mmrl import SCALE
from methods.promptsrc import TEACHER_TEMPLATES, gpa_weights


def built(name, task, **hp):
    method = REGISTRY[name](**{**REGISTRY[name].defaults, **hp})
    torch.manual_seed(0)
    method.build(task)
    return method


def test_gpa_weights_follow_the_gaussian_over_epochs_and_sum_to_one():
    w = gpa_weights(20, 15, 1)  # the base-to-new config
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and int(w.argmax()) == 14  # epoch 15
    for e in range(1, 20):  # consecutive weights in the ratio of the normal density
        assert float(w[e] / w[e - 1]) == pytest.approx(math.exp(-0.5 * ((e + 1 - 15) ** 2 - (e - 15) ** 2)), rel=1e-9)
    assert [round(float(w[e - 1]), 3) for e in (13, 14, 15, 16, 17)] == [0.054, 0.242, 0.399, 0.242, 0.054]
    flat = gpa_weights(50, 30, 30)  # the few-shot config: nearly flat
    assert float(flat.min() / flat.max()) > 0.6 and float(flat.sum()) == pytest.approx(1.0)


def test_promptsrc_keeps_the_gaussian_weighted_sum_of_each_epochs_prompts(tiny, demo_root, monkeypatch):
    task = make_task(tiny, "demo_shapes", 1)
    snapshots = []
    real_train = promptsrc.dassl_loop.train

    def recording_train(task, params, hp, epochs, forward_backward, desc, on_epoch_end=None):
        def both(epoch):
            snapshots.append([p.detach().clone() for p in params])
            on_epoch_end(epoch)

        return real_train(task, params, hp, epochs, forward_backward, desc, on_epoch_end=both)

    monkeypatch.setattr(promptsrc.dassl_loop, "train", recording_train)
    method = REGISTRY["promptsrc"](**{**REGISTRY["promptsrc"].defaults, "prompt_depth_text": 2, "prompt_depth_vision": 2,
                                      "epochs": 3, "gpa_mean": 2.0, "gpa_std": 1.0, "batch_size": 8})
    torch.manual_seed(0)
    method.fit(task)
    weights = gpa_weights(3, 2.0, 1.0)
    assert len(snapshots) == 3 and not torch.equal(snapshots[0][0], snapshots[2][0])  # the prompts moved
    for i, p in enumerate(method.prompts.parameters()):
        expected = sum(float(weights[e]) * snapshots[e][i] for e in range(3))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_promptsrc_regularisers_vanish_at_clip_and_follow_the_official_formulas(tiny, demo_root):
    task = make_task(tiny, "demo_shapes", 1)
    method = built("promptsrc", task, prompt_depth_text=2, prompt_depth_vision=2)
    # The teacher's text: CLIP's text features averaged over the 60 templates BEFORE normalising.
    per_template = torch.stack([encode_text(tiny.model, tiny.tokenize([t.format(c) for c in task.classnames])) for t in TEACHER_TEMPLATES])
    torch.testing.assert_close(method.teacher_text, F.normalize(per_template.mean(0), dim=-1), rtol=0, atol=1e-5)
    assert len(TEACHER_TEMPLATES) == 60 and "a photo of a {}." in TEACHER_TEMPLATES
    pixels = torch.rand(5, 3, tiny.image_size, tiny.image_size)
    with torch.no_grad():
        clip_image = method.image_features(task, pixels, prompted=False)
        prompted = method.image_features(task, pixels)
    torch.testing.assert_close(clip_image, F.normalize(tiny.model.encode_image(pixels), dim=-1), rtol=0, atol=1e-5)
    # Features equal to frozen CLIP's: every self-regularising term is zero.
    at_clip = method.losses(method.logit_scale * clip_image @ method.teacher_text.T, method.teacher_text, clip_image, clip_image)
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in at_clip.values())
    # Away from it: L1 means x 25 and x 10, and KL(teacher || prompted) summed over B x C, divided by B x C.
    text = F.normalize(method.teacher_text + 0.1, dim=-1)
    logits = method.logit_scale * prompted @ text.T
    away = method.losses(logits, text, prompted, clip_image)
    p_teacher = F.softmax(method.logit_scale * clip_image @ method.teacher_text.T, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(logits, dim=1))).sum() / logits.numel()
    assert float(away["logits"]) == pytest.approx(float(kl), rel=1e-4) and float(away["logits"]) > 0
    assert float(away["text"]) == pytest.approx(25 * float((text - method.teacher_text).abs().mean()), rel=1e-5)
    assert float(away["image"]) == pytest.approx(10 * float((prompted - clip_image).abs().mean()), rel=1e-5)


def test_promptsrc_prompts_replace_each_layers_tokens_in_both_towers(tiny, demo_root):
    task = make_task(tiny, "demo_shapes", 1)
    method = built("promptsrc", task, prompt_depth_text=2, prompt_depth_vision=2)
    assert len(method.prompts.deep_text) == 1 and len(method.prompts.deep_vision) == 1
    seen = block_inputs(tiny.model, lambda: (method.text_features(task, method.tokens),
                                             method.image_features(task, torch.rand(2, 3, tiny.image_size, tiny.image_size))))
    n = len(task.classnames)
    assert torch.equal(seen["text"][0][:, 1:5], (method.prompts.ctx + tiny.model.positional_embedding[1:5]).expand(n, -1, -1))
    assert torch.equal(seen["text"][1][:, 1:5], method.prompts.deep_text[0].expand(n, -1, -1))  # layer 1: its own prompts
    patches = (tiny.image_size // tiny.model.visual.patch_size[0]) ** 2
    assert seen["vision"][0].shape[1] == 1 + patches + 4  # CLS, patches, the 4 appended vision prompts
    torch.testing.assert_close(seen["vision"][1][:, -4:], method.prompts.deep_vision[0].expand(2, -1, -1), rtol=0, atol=0)
    assert not torch.equal(method.prompts.deep_vision[0], method.prompts.vision)  # independent of the layer-0 prompts


def test_promptsrc_trains_46080_prompt_parameters_on_vit_b16(demo_root):
    """4 x 512 text ctx + 8 deep text prompts (4 x 512) + 4 x 768 vision + 8 deep vision (4 x 768)."""
    model = build_architecture("ViT-B-16").eval().requires_grad_(False)
    task = make_task(Backbone("ViT-B-16", model, 224, "random", torch.device("cpu")), "demo_shapes", 1)
    assert built("promptsrc", task).trainable_parameters() == 46_080 == 9 * 4 * 512 + 9 * 4 * 768
    assert built("promptsrc", task, prompt_depth_text=3, prompt_depth_vision=3).trainable_parameters() == 3 * 4 * (512 + 768)


def test_each_protocol_takes_its_papers_recipe_unless_told_otherwise():
    own, _ = resolve_hparams("promptsrc", "dtd", "standard", {}, "base2new")
    few, _ = resolve_hparams("promptsrc", "dtd", "standard", {}, "base2new", recipe="fewshot")
    assert (own["epochs"], own["gpa_mean"], own["gpa_std"]) == (20, 15, 1)
    assert (few["epochs"], few["gpa_mean"], few["gpa_std"]) == (50, 45, 5)  # DTD: GPA 45 / 5 in the few-shot config
    cross, _ = resolve_hparams("promptsrc", "imagenet", "standard", {}, "cross_dataset")
    assert (cross["prompt_depth_text"], cross["prompt_depth_vision"], cross["gpa_mean"], cross["gpa_std"]) == (3, 3, 6, 10)
    reverse, _ = resolve_hparams("promptsrc", "imagenet", "standard", {}, "fewshot", recipe="base2new")
    assert reverse["epochs"] == 20
    grid = {(s.method, s.recipe): s for r in (None, "fewshot") for s in build_grid(["promptsrc", "maple"], ["dtd"], "standard", [16], [1],
                                                                                   {"ViT-B-16": "w"}, "bf16", {}, protocol="base2new", recipe=r)}
    # MaPLe has no base-to-new recipe of its own: the few-shot one is the same run, not another row
    assert ("maple", "fewshot") not in grid and ("promptsrc", "fewshot") in grid
    assert grid[("promptsrc", "fewshot")].config_hash != grid[("promptsrc", "base2new")].config_hash
    assert display_name("promptsrc", grid[("promptsrc", "fewshot")].config) == "promptsrc (base2new, fewshot recipe)"
    assert display_name("promptsrc", grid[("promptsrc", "base2new")].config) == "promptsrc (base2new)"


def test_an_unknown_recipe_is_refused_before_any_run(tmp_path, capsys, demo_root):
    db = tmp_path / "r.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", "promptsrc", "-d", "demo_shapes", "--protocol", "base2new",
                    "--recipe", "fewshots", "--db", str(db)]) == 2
    assert "Unknown protocol 'fewshots'" in capsys.readouterr().err and not db.exists()


def test_base_to_new_frontier_on_the_demo_under_both_recipes(tmp_path, demo_root):
    """Above zero-shot's H on the demo's base-to-new; the recipe is stored with each run and the report
    sets one recipe beside the other."""
    db, out = tmp_path / "b2n.duckdb", tmp_path / "rep"
    common = ["--suite", "demo", "-d", "demo_shapes", "--protocol", "base2new", "--seeds", "1", "--db", str(db)]
    assert run_cli(["run", "-m", "zero_shot,promptsrc", *common]) == 0
    assert run_cli(["run", "-m", "promptsrc", "--recipe", "fewshot", *common, "--set", "epochs=10"]) == 0
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT method, top1, json_extract_string(config, '$.recipe') FROM runs").fetchall()
    headline = {(m, r): h for m, h, r in rows}
    assert headline[("promptsrc", "base2new")] > headline[("zero_shot", "base2new")]
    assert ("promptsrc", "fewshot") in headline
    assert run_cli(["report", "--db", str(db), "--out", str(out)]) == 0
    html = (out / "index.html").read_text()
    recipes = html[html.index('id="recipes"'):html.index('id="gap"')]
    assert "promptsrc" in recipes and "fewshot" in recipes and "One recipe across protocols" in recipes


# --- MMRL ------------------------------------------------------------------------------------------


def test_mmrl_tokens_enter_only_the_representation_layers(tiny, demo_root):
    task = make_task(tiny, "demo_shapes", 1)
    method = built("mmrl", task, rep_layers=[2])
    seen = block_inputs(tiny.model, lambda: (method.text_features(task, method.tokens),
                                             method.image_features(task, torch.rand(2, 3, tiny.image_size, tiny.image_size))))
    vision, text = method.learner.mapped()
    patches = (tiny.image_size // tiny.model.visual.patch_size[0]) ** 2
    length = method.tokens.argmax(-1).max() + 1
    assert seen["vision"][0].shape[1] == 1 + patches and seen["text"][0].shape[1] == length  # layer 1: untouched
    assert seen["vision"][1].shape[1] == 1 + 5 + patches and seen["text"][1].shape[1] == length + 5  # layer 2: K = 5 more
    torch.testing.assert_close(seen["vision"][1][:, 1:6], vision[0].expand(2, -1, -1), rtol=0, atol=0)  # right after CLS
    torch.testing.assert_close(seen["text"][1][:, 1:6], text[0].expand(len(task.classnames), -1, -1), rtol=0, atol=0)  # after BOT
    both = built("mmrl", task, rep_layers=[1, 2])  # a later layer replaces the K outputs, it does not add more
    seen = block_inputs(tiny.model, lambda: both.image_features(task, torch.rand(2, 3, tiny.image_size, tiny.image_size)))
    assert seen["vision"][0].shape[1] == seen["vision"][1].shape[1] == 1 + 5 + patches
    torch.testing.assert_close(seen["vision"][1][:, 1:6], both.learner.mapped()[0][1].expand(2, -1, -1), rtol=0, atol=0)


def test_mmrl_fuses_its_two_logits_only_on_its_training_classes(tiny, demo_root):
    task = make_task(tiny, "demo_shapes", 1)
    method = built("mmrl", task, rep_layers=[2])
    images = eval_images(task)
    with torch.no_grad():
        pixels = images.eval_pixels()
        image, rep = method.image_features(task, normalize(pixels, task.device))
        text = method.text_features(task, method.tokens)
        fused = method.predict(task, images)
        new = method.predict(task, images, task.classnames[:3])
    torch.testing.assert_close(fused, 0.7 * SCALE * image @ text.T + 0.3 * SCALE * rep @ text.T, rtol=0, atol=1e-4)
    torch.testing.assert_close(new, SCALE * image @ text[:3].T, rtol=0, atol=1e-4)  # other classes: the class features alone
    shifted = dataclasses.replace(images, dataset="demo_shapes_recolour")  # another dataset, the same names: a shifted domain
    with torch.no_grad():
        torch.testing.assert_close(method.predict(task, shifted), SCALE * image @ text.T, rtol=0, atol=1e-4)


def test_mmrl_loss_is_the_official_sum(tiny, demo_root):
    task = make_task(tiny, "demo_shapes", 1)
    method = built("mmrl", task, rep_layers=[2], reg_weight=3.0)
    gen = torch.Generator().manual_seed(0)
    image, rep, clip_image = (F.normalize(torch.randn(4, tiny.embed_dim, generator=gen), dim=-1) for _ in range(3))
    text = F.normalize(method.clip_text + 0.05 * torch.randn(method.clip_text.shape, generator=gen), dim=-1)
    labels = torch.tensor([0, 1, 2, 0])
    expected = (0.7 * F.cross_entropy(100 * image @ text.T, labels) + 0.3 * F.cross_entropy(100 * rep @ text.T, labels)
                + 3.0 * (1 - (image * clip_image).sum(-1).mean()) + 3.0 * (1 - (text * method.clip_text).sum(-1).mean()))
    assert float(method.loss(image, rep, text, clip_image, labels)) == pytest.approx(float(expected), rel=1e-5)


def test_mmrl_parameter_counts_on_vit_b16(demo_root):
    """5 x 512 tokens + 7 x Linear(512, 768) + 7 x Linear(512, 512) + proj_rep 768 x 512 = 4,992,256;
    EuroSAT's d_r = 2048: 18,762,496 (../shared/FRONTIER.md, MMRL section)."""
    model = build_architecture("ViT-B-16").eval().requires_grad_(False)
    task = make_task(Backbone("ViT-B-16", model, 224, "random", torch.device("cpu")), "demo_shapes", 1)
    method = built("mmrl", task)
    assert method.trainable_parameters() == 4_992_256
    assert built("mmrl", task, rep_dim=2048).trainable_parameters() == 18_762_496
    first = method.learner.to_vision[0]
    assert all(torch.equal(a.weight, first.weight) and torch.equal(a.bias, first.bias) for a in method.learner.to_vision)  # cloned
    assert float(method.learner.proj_rep.detach().std()) == pytest.approx(768**-0.5, rel=0.02)


def test_published_promptsrc_and_mmrl_rows_load_and_agree_with_themselves():
    from harness.protocols import harmonic_mean
    from harness.published import generalisation_frame, published_frame

    g = generalisation_frame()
    b2n = g[g.protocol == "base2new"].pivot_table(index=["method", "dataset"], columns="metric", values="top1")
    assert b2n.loc[("promptsrc", "average"), "hm"] == 79.97 and b2n.loc[("mmrl", "average"), "hm"] == 81.20
    promptsrc_rows = b2n.loc["promptsrc"]
    assert len(promptsrc_rows) == 12  # 11 datasets and the average
    for dataset, row in promptsrc_rows.iterrows():  # every printed H is the harmonic mean of its base and new
        assert harmonic_mean(row["base"], row["new"]) == pytest.approx(row["hm"], abs=0.02), dataset
    cross = g[(g.protocol == "cross_dataset") & (g.method == "promptsrc")].set_index("target")["top1"]
    targets = [t for t in cross.index if t not in ("imagenet", "average")]
    assert len(targets) == 10 and sum(cross[targets]) / 10 == pytest.approx(cross["average"], abs=0.01)
    few = published_frame()
    few = few[few.method == "promptsrc"].pivot_table(index="dataset", columns="shots", values="top1")
    assert few.loc["average", 16] == 82.87 and few.drop(index="average")[16].mean() == pytest.approx(82.87, abs=0.01)
