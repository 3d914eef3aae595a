"""The data protocol: CoOp readers, Dassl few-shot sampling, manifests, dataset checks, demo suite."""

import json
import random
import subprocess
import sys

import pytest
from coop_layout import make_fgvc, make_imagenet, make_split_json

from harness.cards import get_card, suite_cards
from harness.data.check import check_dataset
from harness.data.fewshot import sample_clip_lora, sample_coop
from harness.data.images import eval_view, load_rgb
from harness.data.readers import read_dataset
from harness.errors import DataError


def test_cards_cover_the_eleven_datasets_and_the_demo_suite():
    standard = {c.name for c in suite_cards("standard")}
    assert standard == {
        "imagenet", "sun397", "fgvc_aircraft", "eurosat", "stanford_cars", "food101",
        "oxford_pets", "oxford_flowers", "caltech101", "dtd", "ucf101",
    }
    assert len(suite_cards("demo")) >= 3
    assert get_card("dtd").template == "{} texture."
    assert get_card("fgvc_aircraft").tip_adapter == {"search_scale": [30, 30], "init_alpha": 5, "init_beta": 1}
    assert len(get_card("imagenet").templates) == 7
    assert sum(c.test_size for c in suite_cards("standard")) == 50000 + 19850 + 3333 + 8100 + 8041 + 30300 + 3669 + 2463 + 2465 + 1692 + 3783


def test_split_json_reader(tmp_path):
    make_split_json(tmp_path)
    splits = read_dataset(get_card("eurosat"), tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 9, 15)
    assert splits.classnames == ["annual crop", "forest", "river"]
    assert splits.train[0].path == "2750/annualcrop/train_0.jpg"
    assert (splits.root / splits.train[0].path).is_file()


def test_fgvc_reader_labels_from_variants(tmp_path):
    make_fgvc(tmp_path)
    splits = read_dataset(get_card("fgvc_aircraft"), tmp_path)
    assert splits.classnames == ["707-320", "A300B4", "Cessna 172"]
    assert [it.label for it in splits.test if it.classname == "Cessna 172"] == [2] * 4
    assert all((splits.root / it.path).is_file() for it in splits.train)


def test_imagenet_reader_uses_val_as_test(tmp_path):
    make_imagenet(tmp_path)
    splits = read_dataset(get_card("imagenet"), tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 0, 12)
    assert splits.classnames == ["tench", "goldfish", "great white shark"]


def dassl_reference(items, k, repeat=False):
    """Dassl's generate_fewshot_dataset, written independently of the harness: master's default
    repeat=False keeps a short label whole; CLIP-LoRA's copy (repeat=True) pads it."""
    from collections import defaultdict

    groups = defaultdict(list)
    for it in items:
        groups[it.label].append(it)
    out = []
    for group in groups.values():
        if len(group) >= k:
            out.extend(random.sample(group, k))
        elif repeat:
            out.extend(random.choices(group, k=k))
        else:
            out.extend(group)
    return out


def test_coop_sampler_follows_dassl(tmp_path):
    make_split_json(tmp_path, per_split=(10, 6, 2))
    splits = read_dataset(get_card("eurosat"), tmp_path)
    m = sample_coop(splits, shots=4, seed=1)
    random.seed(1)  # CoOp: train first, then val (min(K, 4)), one stream
    assert m.train == dassl_reference(splits.train, 4)
    assert m.val == dassl_reference(splits.val, 4)
    two = sample_coop(splits, shots=2, seed=1)
    assert [sum(i.label == c for i in two.val) for c in range(3)] == [2, 2, 2]
    assert sample_coop(splits, shots=4, seed=2).train != m.train
    big = sample_coop(splits, shots=16, seed=1)  # fewer items than K: kept whole, never padded
    random.seed(1)
    assert big.train == dassl_reference(splits.train, 16) and len(big.train) == 30 == len(set(big.train))


def test_coop_sampler_keeps_short_classes_whole_and_the_stream_after_them(tmp_path):
    """Dassl master (repeat=False): a class shorter than K keeps its images without a draw, so the
    classes after it draw from the same stream as if it were absent; padding would shift them."""
    make_split_json(tmp_path, per_split=(10, 6, 2))
    splits = read_dataset(get_card("eurosat"), tmp_path)
    short = [it for it in splits.train if it.label != 1 or it.path.endswith(("_0.jpg", "_1.jpg", "_2.jpg"))]
    splits.train[:] = short  # class 1 (in the middle) now has 3 training images
    m = sample_coop(splits, shots=4, seed=7)
    random.seed(7)
    assert m.train == dassl_reference(splits.train, 4) and m.val == dassl_reference(splits.val, 4)
    assert [sum(i.label == c for i in m.train) for c in range(3)] == [4, 3, 4]
    assert [i for i in m.train if i.label == 1] == [i for i in short if i.label == 1]  # split order, no draw
    random.seed(7)
    padded = dassl_reference(splits.train, 4, repeat=True)
    assert [i for i in padded if i.label == 2] != [i for i in m.train if i.label == 2]  # the stream after it moved


def test_coop_imagenet_train_is_coops_own_draw(tmp_path):
    """CoOp's imagenet.py draws exactly K per class with Dassl; the val subset comes afterwards."""
    make_imagenet(tmp_path)
    splits = read_dataset(get_card("imagenet"), tmp_path)
    for shots, seed in ((2, 3), (4, 1)):
        m = sample_coop(splits, shots=shots, seed=seed)
        random.seed(seed)
        assert m.train == dassl_reference(splits.train, shots)
        assert [sum(i.label == c for i in m.val) for c in range(3)] == [min(shots, 4)] * 3
        assert not set(m.train) & set(m.val)


def test_clip_lora_sampler_draws_val_first_and_pads(tmp_path):
    make_split_json(tmp_path, per_split=(10, 6, 2))
    splits = read_dataset(get_card("eurosat"), tmp_path)
    m = sample_clip_lora(splits, shots=16, seed=2)
    random.seed(2)  # CLIP-LoRA: val (min(K, 4)) first, then train, short classes padded
    val = dassl_reference(splits.val, 4, repeat=True)
    assert m.val == val and m.train == dassl_reference(splits.train, 16, repeat=True)
    assert len(m.train) == 48 and len(set(m.train)) < 48  # drawn with replacement
    assert sample_clip_lora(splits, 4, 2).train != sample_coop(splits, 4, 2).train


def test_clip_lora_imagenet_splits_one_draw_per_class(tmp_path):
    make_imagenet(tmp_path)
    splits = read_dataset(get_card("imagenet"), tmp_path)
    m = sample_clip_lora(splits, shots=2, seed=3)
    random.seed(3)
    train, val = [], []
    for c in range(3):
        drawn = random.sample([it for it in splits.train if it.label == c], 4)
        train += drawn[:2]
        val += drawn[2:]
    assert (m.train, m.val) == (train, val)
    with pytest.raises(DataError, match="cannot pad"):
        sample_clip_lora(splits, shots=8, seed=1)


def test_manifest_cli_is_identical_across_processes(tmp_path):
    make_split_json(tmp_path, per_split=(10, 6, 2))
    cmd = [sys.executable, "-m", "harness", "data", "manifest", "-d", "eurosat", "--shots", "4", "--seed", "2", "--data-root", str(tmp_path)]
    outs = [subprocess.run(cmd, capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert outs[0] == outs[1]
    manifest = json.loads(outs[0])
    train, val = manifest["train"], manifest["val"]
    assert [sum(r["label"] == c for r in train) for c in range(3)] == [4, 4, 4]
    assert [sum(r["label"] == c for r in val) for c in range(3)] == [4, 4, 4]
    assert not {r["path"] for r in train} & {r["path"] for r in val}
    assert len(manifest["hash"]) == 64


def test_data_check_reports_present_incomplete_missing(tmp_path):
    make_split_json(tmp_path)
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{not json")
    results = {c.name: check_dataset(c, tmp_path) for c in suite_cards("standard")}
    assert results["eurosat"].status == "incomplete"  # 15 test images against the card's 8100
    assert "card expects 8100" in results["eurosat"].detail
    assert results["dtd"].status == "incomplete" and "unreadable" in results["dtd"].detail
    assert results["imagenet"].status == "missing" and results["imagenet"].path == tmp_path / "imagenet"


def test_demo_suite_is_coop_layout_and_complete(demo_root):
    for card in suite_cards("demo"):
        result = check_dataset(card, demo_root)
        assert result.status == "present", result.detail
        splits = read_dataset(card, demo_root)
        assert len(splits.test) >= 200 and len(splits.classnames) == card.num_classes
        assert (demo_root / card.folder / card.split_file).is_file()


def test_eval_view_resizes_shorter_side_then_centre_crops(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 25, 50))  # white left quarter: cropped away by a centre crop
    view = eval_view(img, 32)
    assert view.shape == (3, 32, 32)
    assert view[:, :, 0].float().mean() < 40  # a straight resize would keep the white band


def test_corrupt_image_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="corrupt"):
        load_rgb(bad)


@pytest.mark.parametrize("shape", [(300, 500), (333, 777), (64, 64)])
def test_eval_pixels_equal_open_clips_own_preprocess(shape):
    import numpy as np
    import torch
    from open_clip.transform import image_transform
    from PIL import Image

    from harness.data.images import normalize

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8))
    ours = normalize(eval_view(img, 224)[None], "cpu")[0]
    assert torch.allclose(ours, image_transform(224, is_train=False)(img), atol=1e-5)
