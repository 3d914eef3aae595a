"""`harness run --splits DIR`: CoOp's split_fewshot pickles and 2SFS's JSON Lines files, validated."""

import json
import pickle
import sys
import types

import duckdb
import pytest
import torch
from coop_layout import make_imagenet, make_split_json

from harness.backbones import build_tiny
from harness.cards import get_card
from harness.cli import run_cli
from harness.data.readers import read_dataset
from harness.data.splitfiles import read_split_files
from harness.errors import DataError


@pytest.fixture
def dassl_datum():
    """A class pickled as Dassl's own `dassl.data.datasets.base_dataset.Datum`, as CoOp writes it."""
    module = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath, label, classname, domain=0):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    parents = ["dassl", "dassl.data", "dassl.data.datasets"]
    for name in parents:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    yield Datum
    for name in parents + [module.__name__]:
        del sys.modules[name]


def coop_pickle(folder, datum, shots, seed, train, val):
    """CoOp's cache file, with absolute image paths of the machine that wrote it."""
    def rows(items):
        return [datum(f"/home/someone/DATA/eurosat/{it.path}", it.label, it.classname) for it in items]

    path = folder / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump({"train": rows(train), "val": rows(val)}, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def jsonl(path, items, prefix):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(
        json.dumps({"_impath": f"{prefix}{it.path}", "_label": it.label, "_domain": -1, "_classname": it.classname}) + "\n"
        for it in items
    ))


def test_coop_pickle_is_read_as_the_subset(tmp_path, dassl_datum):
    folder = make_split_json(tmp_path)
    splits = read_dataset(get_card("eurosat"), tmp_path)
    train, val = splits.train[::3], splits.val[::2]
    coop_pickle(folder, dassl_datum, 2, 1, train, val)
    manifest, sha = read_split_files(splits, tmp_path, 2, 1)
    assert (manifest.train, manifest.val) == (train, val) and len(sha) == 64


def test_jsonl_files_relative_and_absolute_paths(tmp_path):
    folder = make_split_json(tmp_path)
    splits = read_dataset(get_card("eurosat"), tmp_path)
    train, val = splits.train[1::3], splits.val[::3]
    jsonl(folder / "split_fewshot" / "shot_2-seed_3_train.jsonl", train, "eurosat/")  # relative to the data root
    jsonl(folder / "split_fewshot" / "shot_2-seed_3_val.jsonl", val, f"{folder}/")  # absolute
    manifest, sha = read_split_files(splits, tmp_path, 2, 3)
    assert (manifest.train, manifest.val) == (train, val)
    jsonl(folder / "split_fewshot" / "shot_2-seed_3_val.jsonl", splits.val[1::3], "eurosat/")
    assert read_split_files(splits, tmp_path, 2, 3)[1] != sha  # the content is the identity


def test_imagenet_jsonl_without_val_draws_val_from_the_rest(tmp_path):
    folder = make_imagenet(tmp_path)
    splits = read_dataset(get_card("imagenet"), tmp_path)
    train = [it for it in splits.train if it.path.endswith(("_0.JPEG", "_1.JPEG"))]
    jsonl(folder / "split_fewshot" / "shot_2-seed_1_train.jsonl", train, "imagenet/")
    manifest, _ = read_split_files(splits, tmp_path, 2, 1)
    assert manifest.train == train
    assert len(manifest.val) == 6 and not set(manifest.val) & set(train)


def test_malicious_pickle_is_refused(tmp_path):
    folder = make_split_json(tmp_path)
    splits = read_dataset(get_card("eurosat"), tmp_path)
    path = folder / "split_fewshot" / "shot_1-seed_1.pkl"
    path.parent.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({"train": [Evil()], "val": []}))
    with pytest.raises(DataError, match="refused.*builtins.print"):
        read_split_files(splits, tmp_path, 1, 1)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows[:-2], "no training image for class 2 \\(river\\)"),
        (lambda rows: rows[:1] + [{**rows[1], "_label": 7}] + rows[2:], "label 7 is out of range"),
        (lambda rows: rows[:1] + [{**rows[1], "_impath": "eurosat/2750/forest/nope.jpg"}] + rows[2:], "is not found"),
        (lambda rows: rows[:1] + [{**rows[1], "_label": 2}] + rows[2:], "has label 2, but 0"),
    ],
)
def test_bad_split_files_name_the_file_and_the_problem(tmp_path, edit, message):
    folder = make_split_json(tmp_path)
    splits = read_dataset(get_card("eurosat"), tmp_path)
    path = folder / "split_fewshot" / "shot_2-seed_1_train.jsonl"
    jsonl(path, [it for it in splits.train if it.path.endswith(("_0.jpg", "_1.jpg"))], "eurosat/")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in edit(rows)))
    with pytest.raises(DataError, match=message) as info:
        read_split_files(splits, tmp_path, 2, 1)
    assert str(path) in str(info.value)


def test_a_split_file_must_hold_the_shots_its_name_says(tmp_path):
    """A file named 1-shot that holds every training image is refused (class, count, file named);
    so are repeats, a val subset larger than min(K, 4) and images in both subsets. A class shorter
    than K may keep all it has or be padded with its own images, as the two samplers do."""
    folder = make_split_json(tmp_path, per_split=(6, 6, 2))
    splits = read_dataset(get_card("eurosat"), tmp_path)
    train_file = folder / "split_fewshot" / "shot_1-seed_1_train.jsonl"
    val_file = folder / "split_fewshot" / "shot_1-seed_1_val.jsonl"
    first = {c: [it for it in splits.train if it.label == c] for c in range(3)}
    one_val = [it for it in splits.val if it.path.endswith("_0.jpg")]

    def refused(train, val, message, path):
        jsonl(train_file, train, "eurosat/")
        jsonl(val_file, val, "eurosat/")
        with pytest.raises(DataError, match=message) as info:
            read_split_files(splits, tmp_path, 1, 1)
        assert str(path) in str(info.value)

    refused(splits.train, one_val, r"class 0 \(annual crop\) has 6 training images; a 1-shot training subset holds 1", train_file)
    refused([first[0][0], first[0][0], first[1][0], first[2][0]], one_val, "has 2 training images, 1 of them repeated", train_file)
    refused([first[c][0] for c in range(3)], splits.val, r"class 0 \(annual crop\) has 6 val images", val_file)
    refused([first[c][0] for c in range(3)], [first[0][0], *one_val[1:]], "is also a training image", val_file)
    # 8 shots where each class has 6 training images: kept whole (Dassl master) or padded to 8 (repeat=True)
    path = folder / "split_fewshot" / "shot_8-seed_1_train.jsonl"
    jsonl(path, splits.train, "eurosat/")
    assert read_split_files(splits, tmp_path, 8, 1)[0].train == splits.train
    padded = [it for c in range(3) for it in first[c] + first[c][:2]]
    jsonl(path, padded, "eurosat/")
    assert len(read_split_files(splits, tmp_path, 8, 1)[0].train) == 24
    jsonl(path, [it for c in range(3) for it in first[c] + first[c][:1]], "eurosat/")  # 7: neither
    with pytest.raises(DataError, match="has 7 training images, 1 of them repeated"):
        read_split_files(splits, tmp_path, 8, 1)


def test_run_with_splits_stores_the_files_hash_and_refuses_missing_ones(tmp_path, capsys):
    folder = make_split_json(tmp_path)
    splits = read_dataset(get_card("eurosat"), tmp_path)
    jsonl(folder / "split_fewshot" / "shot_1-seed_1_train.jsonl", splits.train[::6], "eurosat/")
    jsonl(folder / "split_fewshot" / "shot_1-seed_1_val.jsonl", splits.val[::3], "eurosat/")
    ckpt = tmp_path / "tiny.pt"
    torch.save(build_tiny().state_dict(), ckpt)
    db = tmp_path / "runs.duckdb"
    base = ["run", "-m", "tip_adapter", "-d", "eurosat", "-b", "tiny", "--weights", str(ckpt), "--data-root", str(tmp_path),
            "--db", str(db), "--seeds", "1", "--set", "augment_views=1"]
    assert run_cli(base + ["--shots", "1,2", "--splits", str(tmp_path)]) == 2  # shot_2 files are missing
    assert "shot_2-seed_1" in capsys.readouterr().err and not db.exists()
    assert run_cli(base + ["--shots", "1", "--splits", str(tmp_path)]) == 0
    con = duckdb.connect(str(db), read_only=True)
    config = json.loads(con.execute("SELECT config FROM runs").fetchone()[0])
    con.close()
    assert config["sampler"] == "files" and len(config["split_files_sha256"]) == 64
    assert run_cli(base + ["--shots", "1", "--sampler", "clip_lora"]) == 0  # another subset: another run
    con = duckdb.connect(str(db), read_only=True)
    samplers = sorted(json.loads(c)["sampler"] for (c,) in con.execute("SELECT config FROM runs").fetchall())
    con.close()
    assert samplers == ["clip_lora", "files"]


def test_split_files_changed_after_planning_stop_the_run(tmp_path, tiny):
    """The run is keyed by the files' content when planned; other content at run time is refused."""
    from harness.grid import build_grid
    from harness.runner import run_one
    from methods import ImageSet
    from methods.base import Steps

    folder = make_split_json(tmp_path)
    splits = read_dataset(get_card("eurosat"), tmp_path)
    path = folder / "split_fewshot" / "shot_1-seed_1_train.jsonl"
    jsonl(path, splits.train[::6], "eurosat/")
    _, sha = read_split_files(splits, tmp_path, 1, 1)
    (spec,) = build_grid(["tip_adapter"], ["eurosat"], "standard", [1], [1], {"tiny": tiny.weights}, "fp32",
                         {}, split_hashes={("eurosat", 1, 1): sha}, splits_dir=str(tmp_path))
    jsonl(path, splits.train[1::6], "eurosat/")  # edited after the grid was planned
    test = ImageSet(splits.root, "eurosat", splits.test, tiny.image_size)
    with pytest.raises(DataError, match="changed after the sweep started"):
        run_one(spec, tiny, splits, test, {}, lambda total, desc: Steps())
