"""Never a wrong number: content-keyed caches, split validation, typed hyper-parameters, grid checks,
non-finite predictions, literal messages. Each case ends in exit 2 or a failed run, never an ok run."""

import json
import re
import shutil

import duckdb
import pytest
import torch
from coop_layout import make_split_json
from PIL import Image

from harness.backbones import build_tiny
from harness.cards import get_card
from harness.cli import run_cli
from harness.data.readers import read_dataset
from harness.errors import DataError, HarnessError
from harness.grid import parse_sets, resolve_hparams
from methods import REGISTRY
from methods.base import ImageSet
from methods.hparams import validate


def stored(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT method, shots, seed, status, top1, error, config FROM runs ORDER BY started_at").fetchall()
    finally:
        con.close()


@pytest.fixture
def eurosat(tmp_path):
    folder = make_split_json(tmp_path, per_split=(4, 2, 5))
    ckpt = tmp_path / "tiny.pt"
    torch.save(build_tiny().state_dict(), ckpt)
    return tmp_path, folder, ckpt


def zero_shot_args(root, ckpt, db):
    return ["run", "-m", "zero_shot", "-d", "eurosat", "-b", "tiny", "--weights", str(ckpt), "--data-root", str(root),
            "--db", str(db), "--seeds", "1"]


# 1. Caches keyed by content ------------------------------------------------------------------------


def test_a_changed_image_is_read_again(eurosat):
    root, folder, _ = eurosat
    splits = read_dataset(get_card("eurosat"), root)
    first = ImageSet(splits.root, "eurosat", splits.test, 32)
    key, before = first.key, first.eval_pixels().clone()
    target = folder / splits.test[0].path
    Image.new("RGB", (40, 48), (255, 255, 0)).save(target)  # same path, new content
    again = ImageSet(splits.root, "eurosat", splits.test, 32)
    assert again.key != key
    after = again.eval_pixels()
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])
    target.write_bytes(b"not an image any more")
    with pytest.raises(DataError, match="corrupt"):
        ImageSet(splits.root, "eurosat", splits.test, 32).eval_pixels()


def test_rerun_after_images_changed_stores_the_new_accuracy(eurosat, tmp_path):
    root, folder, ckpt = eurosat
    db = tmp_path / "runs.duckdb"
    assert run_cli(zero_shot_args(root, ckpt, db)) == 0
    splits = read_dataset(get_card("eurosat"), root)
    for it in splits.test:  # every test image becomes a copy of one training image: the accuracy moves
        shutil.copy(folder / splits.train[0].path, folder / it.path)
    assert run_cli(zero_shot_args(root, ckpt, db) + ["--force"]) == 0
    (rerun,) = stored(db)
    other_cache = {"HARNESS_CACHE": str(tmp_path / "fresh-cache")}
    fresh = tmp_path / "fresh.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in other_cache.items():
            mp.setenv(k, v)
        assert run_cli(zero_shot_args(root, ckpt, fresh)) == 0
    assert stored(fresh)[0][4] == rerun[4]  # the number of a run that never saw the old images


# 2. Split validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["train"][0].__setitem__(1, 99), "labels 99 outside 0..3"),
        (lambda s: s["test"][0].__setitem__(1, -1), "labels -1 outside"),
        (lambda s: [r.__setitem__(1, 5) for part in s.values() for r in part if r[1] == 2], "labels 5 outside 0..2 \\(no image has label 2\\)"),
        (lambda s: s["val"][0].__setitem__(2, "lake"), "two class names, 'annual crop' and 'lake'"),
    ],
)
def test_split_labels_must_be_0_to_c_minus_1_with_one_name_each(tmp_path, edit, message):
    folder = make_split_json(tmp_path)
    path = folder / "split_zhou_EuroSAT.json"
    split = json.loads(path.read_text())
    edit(split)
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=message) as info:
        read_dataset(get_card("eurosat"), tmp_path)
    assert str(path) in str(info.value)
    assert run_cli(["run", "-m", "zero_shot", "-d", "eurosat", "-b", "tiny", "--data-root", str(tmp_path), "--db", str(tmp_path / "d.duckdb")]) == 2
    assert not (tmp_path / "d.duckdb").exists()


def test_class_count_must_match_the_card(tmp_path):
    make_split_json(tmp_path, classes=("annual crop", "forest"))  # the test card says 3
    with pytest.raises(DataError, match="2 classes, its card expects 3"):
        read_dataset(get_card("eurosat"), tmp_path)


def test_data_check_lists_every_image_and_exits_2_when_unusable(tmp_path):
    from harness.data.check import check_dataset

    folder = make_split_json(tmp_path)
    assert run_cli(["data", "check", "-d", "eurosat", "--data-root", str(tmp_path)]) == 2  # test size 15 != card's
    (folder / "2750" / "river" / "test_3.jpg").unlink()
    assert "1 of 42 listed images not found" in check_dataset(get_card("eurosat"), tmp_path).detail
    assert run_cli(["data", "check", "--data-root", str(tmp_path / "nothing")]) == 2  # nothing usable


def test_data_check_deep_decodes_images(tmp_path):
    from harness.data.check import check_dataset

    folder = make_split_json(tmp_path)
    card = get_card("eurosat")
    (folder / "2750" / "forest" / "val_1.jpg").write_bytes(b"\x00" * 10)
    assert "corrupt" not in check_dataset(card, tmp_path).detail
    assert "corrupt" in check_dataset(card, tmp_path, deep=True).detail


# 3. Typed hyper-parameters ---------------------------------------------------------------------------


def test_every_default_has_a_schema_and_satisfies_it():
    for name, cls in REGISTRY.items():
        assert set(cls.schema) == set(cls.defaults), name
        assert validate(name, cls.defaults, cls.schema) == cls.defaults, name


@pytest.mark.parametrize(
    "method, pair, message",
    [
        ("coop", "epochs=-5", "epochs=-5 is invalid; it must be an int >= 1 or null"),
        ("coop", "n_ctx=0", "n_ctx=0 is invalid"),
        ("clip_lora", "dropout=1.5", "dropout=1.5 is invalid; it must be a float >= 0 and < 1"),
        ("clip_lora", "encoders=audio", "one of both, vision, text"),
        ("tip_adapter", "search_split=test", "one of fewshot_val, full_val"),
        ("coop", "lr=fast", "lr='fast' is invalid"),
    ],
)
def test_bad_hyper_parameters_are_refused_before_any_run(method, pair, message):
    with pytest.raises(HarnessError, match=message):
        resolve_hparams(method, "demo_shapes", "demo", parse_sets([pair]))


def test_numbers_are_numbers_and_normalised():
    a, _ = resolve_hparams("coop", "demo_shapes", "demo", parse_sets(["lr=1e-3"]))
    b, _ = resolve_hparams("coop", "demo_shapes", "demo", parse_sets(["lr=0.001"]))
    assert a["lr"] == b["lr"] == 0.001 and isinstance(a["lr"], float)
    c, _ = resolve_hparams("coop", "demo_shapes", "demo", parse_sets(["epochs=5.0", "crop_scale=0.5,1"]))
    assert c["epochs"] == 5 and isinstance(c["epochs"], int) and c["crop_scale"] == [0.5, 1.0]


def test_cli_bad_set_exits_2_and_stores_nothing(tmp_path, capsys):
    db = tmp_path / "d.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", "coop", "-d", "demo_shapes", "--set", "epochs=-5", "--db", str(db)]) == 2
    assert "epochs=-5" in capsys.readouterr().err and not db.exists()


# 4. Grid validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "demo", "-d", "demo_shapes", "-m", "coop", "--shots", "0"], "--shots must be integers >= 1"),
        (["--suite", "demo", "-d", "demo_shapes", "-m", "coop", "--shots", "-1"], "--shots must be integers >= 1"),
        (["--suite", "demo", "-d", "demo_shapes", "-m", "coop", "--shots", "100"], "--shots 100: .* demo_shapes has classes with only"),
        (["--suite", "demo", "-d", "demo_shapes", "-m", "zero_shot", "--seeds", "-7"], "--seeds must be integers >= 0"),
        (["--suite", "demos", "-d", "demo_shapes", "-m", "zero_shot"], "Unknown suite 'demos'"),
        (["--suite", "demo", "-d", "dtd", "-m", "zero_shot"], "Dataset 'dtd' belongs to the standard suite"),
        (["--suite", "demo", "-d", "demo_shapes", "-m", "nope"], "Unknown method 'nope'"),
    ],
)
def test_grid_is_checked_before_any_run(tmp_path, capsys, args, message):
    db = tmp_path / "d.duckdb"
    assert run_cli(["run", *args, "--db", str(db)]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert re.search(message, err) and "Traceback" not in err, err
    assert not db.exists()


def test_duplicate_shots_and_seeds_run_once(tmp_path):
    db = tmp_path / "d.duckdb"
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_shapes", "--seeds", "1,1", "--db", str(db)]) == 0
    assert len(stored(db)) == 1


# 5. Non-finite predictions ---------------------------------------------------------------------------


def test_nan_features_fail_the_run_instead_of_storing_chance(eurosat, tmp_path, capsys):
    root, _, _ = eurosat
    model = build_tiny()
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))
    ckpt = tmp_path / "nan.pt"
    torch.save(model.state_dict(), ckpt)
    db = tmp_path / "runs.duckdb"
    assert run_cli(zero_shot_args(root, ckpt, db)) == 1
    (row,) = stored(db)
    assert row[3] == "failed" and row[4] is None and "non-finite logits" in row[5]


# 6. Messages print literally -------------------------------------------------------------------------


def test_error_text_in_brackets_is_printed_as_written(tmp_path, capsys):
    folder = make_split_json(tmp_path)
    (folder / "split_zhou_EuroSAT.json").write_text('{"train": 5}')
    assert run_cli(["run", "-m", "zero_shot", "-d", "eurosat", "-b", "tiny", "--data-root", str(tmp_path), "--db", str(tmp_path / "d.duckdb")]) == 2
    assert "[[image_path, label, classname], ...]" in capsys.readouterr().err.replace("\n", "")


def test_corrupt_weights_file_says_so(tmp_path, capsys):
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_shapes", "--weights", str(bad), "--db", str(tmp_path / "d.duckdb")]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "corrupt or not a CLIP checkpoint" in err and "weights_only" not in err
    import argparse

    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "objects.pt")  # a training checkpoint with objects
    assert run_cli(["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_shapes", "--weights", str(tmp_path / "objects.pt"), "--db", str(tmp_path / "d.duckdb")]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "holds Python objects" in err and "weights_only" not in err


def test_zero_shot_template_sets_are_separate_runs_keyed_by_content(tmp_path, capsys):
    templates = tmp_path / "mine.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n")
    db = tmp_path / "d.duckdb"
    base = ["run", "--suite", "demo", "-m", "zero_shot", "-d", "demo_shapes", "--seeds", "1", "--db", str(db)]
    for choice in ("card", "ensemble", str(templates)):
        assert run_cli(base + ["--set", f"templates={choice}"]) == 0
    rows = stored(db)
    assert [json.loads(r[6])["hparams"]["templates"] for r in rows] == ["card", "ensemble", ["a photo of a {}.", "a drawing of a {}."]]
    assert rows[0][4] != rows[2][4]  # another template set, another accuracy
    moved = tmp_path / "moved.txt"
    templates.rename(moved)
    capsys.readouterr()
    assert run_cli(base + ["--set", f"templates={moved}"]) == 0  # same content elsewhere: the same run
    assert "Nothing to do" in capsys.readouterr().out
    moved.write_text("no placeholder here\n")
    assert run_cli(base + ["--set", f"templates={moved}"]) == 2


@pytest.mark.parametrize("method,sets", [
    ("cocoop", ["--set", "epochs=1", "--set", "epoch_scale=1"]),
    ("taskres", ["--set", "warmup_epochs=300"]),
    ("prograd", ["--set", "epoch_scale=0.001"]),
    ("plot_pp", ["--set", "warmup_epochs=10"]),
    ("clap", ["--set", "epochs=1"]),
])
def test_a_warm_up_as_long_as_training_is_refused_before_any_run(tmp_path, capsys, method, sets):
    db = tmp_path / "h.duckdb"
    args = ["run", "--suite", "demo", "-m", method, "-d", "demo_colours", "--shots", "1", "--seeds", "1", "--db", str(db), *sets]
    assert run_cli(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{method} on demo_colours, 1 shots: warmup_epochs=" in err and "is not shorter than the" in err
    assert not db.exists()  # nothing stored, the database not even created
