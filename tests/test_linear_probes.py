"""CLIP-Adapter, TaskRes, LP++ and CLAP: their formulas, parameter counts, learning on the demo suite,
the generalisation protocols, and the shared bank of encoded augmented views."""

from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest
import torch
import torch.nn.functional as F
from runs import eval_images, run_method

import methods.clip_adapter as ca
import methods.feature_bank as bank
import methods.lp_pp as lp
import methods.taskres as tr
from harness.cards import get_card
from harness.cli import run_cli
from harness.data.fewshot import manifest_for
from harness.runner import load_datasets
from methods import REGISTRY, ImageSet, Task, clap
from methods.zero_shot import ZeroShot

FOUR = ("clip_adapter", "taskres", "lp_pp", "clap")
DEMO = ("demo_colours", "demo_shapes", "demo_textures")


def make_task(backbone, dataset="demo_colours", shots=2, seed=1, cache=None) -> Task:
    splits = load_datasets([dataset], Path("."))[dataset]
    manifest = manifest_for(splits, shots, seed)
    size = backbone.image_size
    return Task(
        card=splits.card, classnames=[c.replace("_", " ") for c in splits.classnames], shots=shots, seed=seed,
        backbone=backbone, precision="fp32",
        train=ImageSet(splits.root, dataset, manifest.train, size), val=ImageSet(splits.root, dataset, manifest.val, size),
        feature_cache={} if cache is None else cache,
    )


# --- formulas -------------------------------------------------------------------------------------


def test_taskres_at_init_is_zero_shot_with_its_base(random_tiny, demo_root):
    task = make_task(random_tiny)
    method = tr.TaskRes()
    method.init_classifier(task)
    assert torch.count_nonzero(method.residual) == 0
    test = eval_images(task)
    logits = method.predict(task, test)
    f = task.frozen_features(test)
    base = tr.raw_text_base(task, (task.card.template,))  # one template on the demo: its base
    assert torch.equal(logits, 100.0 * F.normalize(f, dim=-1) @ F.normalize(base, dim=-1).T)  # exactly, alpha * 0 added
    zs = ZeroShot()
    zs.fit(task)  # the harness's zero-shot with the same single template
    torch.testing.assert_close(logits, zs.predict(task, test))
    # ImageNet's base: the 7 select templates + "a photo of a {}."; the others: the card's one template.
    imagenet = tr.base_templates(SimpleNamespace(card=get_card("imagenet")))
    assert len(imagenet) == 8 and imagenet[-1] == "a photo of a {}." and imagenet[0] == "itap of a {}."
    assert tr.base_templates(SimpleNamespace(card=get_card("dtd"))) == (get_card("dtd").template,)
    assert tr.epochs_for_shots(4) == 100 and tr.epochs_for_shots(8) == 200


def test_card_recipes_for_taskres():
    assert REGISTRY["taskres"].defaults["lr"] == 2e-3 and REGISTRY["taskres"].defaults["alpha"] == 0.5
    assert get_card("imagenet").recipe_for("taskres") == {"lr": 2e-4}
    assert get_card("oxford_flowers").recipe_for("taskres") == {"alpha": 1.0}
    assert get_card("dtd").recipe_for("taskres") == {}


def test_clap_constraint_pulls_towards_the_zero_shot_prototypes():
    gen = torch.Generator().manual_seed(0)
    c, d, m = 3, 8, 60
    base = torch.randn(c, d, generator=gen)
    labels = torch.arange(m) % c
    feats = F.normalize(torch.randn(m, d, generator=gen) + 2 * torch.roll(base, 1, 0)[labels], dim=-1)  # far from t
    hp = {**REGISTRY["clap"].defaults, "epochs": 30}
    distance = {}
    for lam in (0.0, 5.0):  # 5: large but stable under lr 0.1 (the step on w_c scales 2 lr lambda / C)
        torch.manual_seed(0)
        w = clap.train_prototypes(feats[None], labels, base, torch.full((c,), lam), hp)  # one view of m images
        distance[lam] = float((w - base).norm())
    assert distance[0.0] > 0.1 and distance[5.0] < distance[0.0] / 5, distance
    # lambda_c: the mean zero-shot probability of the true class over class c's features.
    probs = (100 * feats @ F.normalize(base, dim=-1).T).softmax(-1)
    expected = torch.stack([probs[labels == k, k].mean() for k in range(c)])
    torch.testing.assert_close(clap.lagrangian_multipliers(feats, labels, base), expected)
    # the loss: CE + mean_c lambda_c ||w_c - t_c||^2
    w = base + 1.0
    lam = torch.tensor([1.0, 2.0, 3.0])
    ce = F.cross_entropy(100 * feats @ F.normalize(w, dim=-1).T, labels)
    torch.testing.assert_close(clap.clap_loss(feats, labels, w, base, lam), ce + (lam * d).mean())


def test_lp_pp_step_sizes_follow_the_formulas():
    # F^T F = diag(9, 4): lambda_max = 9; N = 4.
    feats = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 0, 1])
    assert lp.lr_w(feats) == pytest.approx(4 * 4 / 9)
    # sum_i (f_i . t_c)^2: class 0: 9; class 1: 1.8^2 + 1.6^2 = 5.8 -> max 9
    assert lp.lr_alpha(feats, text) == pytest.approx(4 / (4 * 9))
    # per class mean of f_i . t_c over its own images: class 0: (3 + 0) / 2, class 1: (1.6 + 0) / 2
    assert lp.init_alpha(feats, labels, text) == pytest.approx((250 * 1.5 + 250 * 0.8) / 2)
    torch.testing.assert_close(lp.class_sums(feats, labels, 2), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))  # sums, not means
    assert lp.lp_pp_parameters(1000, 512) == 514_000 and lp.lp_pp_parameters(10, 512) == 5_140


def test_lp_pp_alpha_gradient_accumulates_as_the_official_code(random_tiny, demo_root):
    task = make_task(random_tiny, shots=4)
    alphas = {}
    for mode in ("accumulate", "current"):
        torch.manual_seed(0)
        m = lp.LPPP(alpha_grad=mode, iterations=30, selection="last")
        m.fit(task)
        alphas[mode] = m.alpha
        assert m.best_iteration == 30
    assert not torch.equal(alphas["accumulate"], alphas["current"])
    torch.manual_seed(0)
    m = lp.LPPP(iterations=30)
    m.fit(task)
    assert 1 <= m.best_iteration <= 30 and m.val_accuracy is not None
    assert REGISTRY["lp_pp"].defaults["selection"] == "val"


def test_clip_adapter_with_zeroed_weights_is_zero_shot(random_tiny, demo_root):
    task = make_task(random_tiny)
    method = ca.CLIPAdapter(epochs=2)
    method.fit(task)
    for p in method.adapter.parameters():
        p.data.zero_()
    zs = ZeroShot()
    zs.fit(task)
    test = eval_images(task)
    torch.testing.assert_close(method.predict(task, test), zs.predict(task, test))
    # open vocabulary: other class names go through the prompt classifier
    names = ["a", "b", "c"]
    torch.testing.assert_close(method.predict(task, test, names), zs.predict(task, test, names))
    # blending the raw feature then normalising = blending the normalised feature (A is positively homogeneous)
    adapter = ca.Adapter(16)
    raw = 7.0 * torch.rand(5, 16) + 0.1
    text = torch.randn(3, 16)
    torch.testing.assert_close(ca.adapter_logits(adapter, raw, text, 0.2), ca.adapter_logits(adapter, F.normalize(raw, dim=-1), text, 0.2))


def test_pooled_loop_takes_dassl_batches_from_the_whole_bank():
    """CLAP's loop (CLIP-Adapter and CLAP): per epoch one shuffle of all V x N features, as many
    batches as Dassl's loader over the N images holds (N // bs, at least 1), full-size batches."""
    from methods.dassl_loop import train_on_features

    weight = torch.zeros(1, requires_grad=True)
    hp = {"lr": 0.1, "warmup_lr": 1e-5, "warmup_epochs": 1, "batch_size": 4}
    for n_images, views, expected in ((10, 20, [4, 4]), (3, 20, [4]), (3, 1, [3])):
        bank, seen = torch.arange(n_images * views, dtype=torch.float).view(views, n_images, 1), []

        def loss_fn(feats, y):
            seen.append(feats.squeeze(1).long().tolist())
            return (weight * feats).sum()

        torch.manual_seed(0)
        train_on_features(torch.optim.SGD([weight], lr=0.1), bank, torch.zeros(n_images, dtype=torch.long), 3, hp, loss_fn, pooled=True)
        assert [len(b) for b in seen] == expected * 3
        if views > 1:
            assert max(max(b) for b in seen) >= n_images  # batches come from the whole bank, not one view


def test_parameter_counts_for_vit_b16():
    d = 512
    assert sum(p.numel() for p in ca.Adapter(d).parameters()) == ca.adapter_parameters(d) == 131_072
    assert ca.adapter_parameters(768) == 294_912
    assert torch.zeros(1000, d).numel() == 512_000 and torch.zeros(10, d).numel() == 5_120  # TaskRes residual, CLAP W
    assert lp.lp_pp_parameters(1000, d) == 514_000 and lp.lp_pp_parameters(10, d) == 5_140


# --- learning on the demo suite ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_records(random_tiny, demo_root):
    return {(m, ds): run_method(m, ds, 0 if m == "zero_shot" else 16, random_tiny) for m in ("zero_shot",) + FOUR for ds in DEMO}


@pytest.mark.parametrize("method,trainable", [("clip_adapter", 2 * 64 * 16), ("taskres", 8 * 64), ("lp_pp", 8 * 66), ("clap", 8 * 64)])
def test_beats_zero_shot_on_the_demo_average_at_16_shots(demo_records, method, trainable):
    for ds in DEMO:
        rec = demo_records[(method, ds)]
        assert rec["status"] == "ok", rec.get("error")
        assert rec["trainable_params"] == trainable
    mean = lambda m: sum(demo_records[(m, ds)]["top1"] for ds in DEMO) / len(DEMO)
    assert mean(method) >= mean("zero_shot") + 2, (method, mean(method), mean("zero_shot"))


def test_selection_is_recorded(demo_records):
    assert demo_records[("lp_pp", "demo_colours")]["config"]["hparams"]["selection"] == "val"
    assert "CLAP's CLIP-Adapter baseline" in REGISTRY["clip_adapter"].deviations


def test_same_seed_same_accuracy(demo_records, random_tiny):
    for m in FOUR:
        assert run_method(m, "demo_colours", 16, random_tiny)["top1"] == demo_records[(m, "demo_colours")]["top1"], m


# --- protocols --------------------------------------------------------------------------------------


def evaluations(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT r.method, e.target, e.status, e.top1, e.n_classes FROM evaluations e JOIN runs r USING (config_hash)").fetchall()
    finally:
        con.close()
    return {(r[0], r[1]): r[2:] for r in rows}


def test_base2new_new_classes_not_applicable_except_clip_adapter(tmp_path):
    db = tmp_path / "d.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", ",".join(FOUR), "--protocol", "base2new", "-d", "demo_colours",
                    "--seeds", "1", "--db", str(db)]) == 0
    rows = evaluations(db)
    for m in ("taskres", "lp_pp", "clap"):
        assert rows[(m, "base")][0] == "ok" and rows[(m, "new")][0] == "not_applicable" and rows[(m, "new")][1] is None
    assert rows[("clip_adapter", "new")][0] == "ok"  # the adapter is class-agnostic; new classes come from prompts


def test_domain_shift_scores_the_shifted_targets(tmp_path):
    db = tmp_path / "d.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", ",".join(FOUR), "--protocol", "domain_shift", "--seeds", "1",
                    "--db", str(db)]) == 0
    rows = evaluations(db)
    for m in FOUR:
        for target in ("demo_shapes_outline", "demo_shapes_recolour"):
            status, top1, n_classes = rows[(m, target)]
            assert status == "ok" and top1 is not None and n_classes == 8, (m, target, rows[(m, target)])


# --- the shared bank of augmented views ---------------------------------------------------------------


def test_feature_bank_is_shared_and_keyed_by_what_changes_the_views(random_tiny, demo_root, monkeypatch):
    calls = []
    real = bank.encode_view

    def counting(task, view, scale, seed, flip=True, **kw):
        calls.append((view, scale, seed))
        return real(task, view, scale, seed, flip, **kw)

    monkeypatch.setattr(bank, "encode_view", counting)
    task = make_task(random_tiny, shots=1, seed=3)
    first = bank.augmented_views(task, 2, (0.08, 1.0))
    assert first.shape == (2, len(task.train), random_tiny.embed_dim) and len(calls) == 2
    assert not torch.equal(first[0], first[1])  # two independent draws
    again = bank.augmented_views(task, 2, (0.08, 1.0))  # memory: no encoder call
    assert torch.equal(again, first) and len(calls) == 2
    fresh = make_task(random_tiny, shots=1, seed=3)  # a new sweep, same subset: from disk
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(bank.augmented_views(fresh, 2, (0.08, 1.0)), first) and len(calls) == 2
    # the first view of a longer bank is the same view; only the new one is encoded
    assert torch.equal(bank.augmented_views(task, 3, (0.08, 1.0))[:2], first) and len(calls) == 3
    # a different crop seed, scale or precision is a different key
    keys = {bank.view_key(task, 0, (0.08, 1.0), 3)}
    keys.add(bank.view_key(task, 0, (0.08, 1.0), 4))
    keys.add(bank.view_key(task, 1, (0.08, 1.0), 3))
    keys.add(bank.view_key(task, 0, (0.5, 1.0), 3))
    keys.add(bank.view_key(Task(**{**task.__dict__, "precision": "bf16"}), 0, (0.08, 1.0), 3))
    assert len(keys) == 5
    other = bank.augmented_views(task, 1, (0.08, 1.0), seed=4)
    assert len(calls) == 4 and not torch.equal(other[0], first[0])
    # a different few-shot subset (seed 1's draw) is a different key
    assert bank.view_key(make_task(random_tiny, shots=1, seed=1), 0, (0.08, 1.0), 3) != bank.view_key(task, 0, (0.08, 1.0), 3)


def test_methods_share_one_bank(random_tiny, demo_root, monkeypatch):
    calls = []
    real = bank.encode_view
    monkeypatch.setattr(bank, "encode_view", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    cache: dict = {}
    task = make_task(random_tiny, shots=1, seed=2, cache=cache)
    for name in ("clap", "taskres"):  # both: 20 views at scale 0.08-1
        torch.manual_seed(0)
        REGISTRY[name](epochs=2).fit(task)
    assert len(calls) == 20
