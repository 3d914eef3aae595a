"""No method sees the test set while it learns, and every run records how its hyper-parameters
were chosen and which official code its method follows."""

from pathlib import Path

import pytest
import torch
from runs import run_method

from harness.grid import build_grid
from harness.runner import load_datasets, run_one
from methods import REGISTRY, ImageSet, Method, Task
from methods.base import Steps
from methods.zero_shot import ZeroShot


class ReadsTheTestSet(Method):
    """A method that tries to learn from the test images."""

    name = "reads_the_test_set"
    paper = "test fixture"

    def fit(self, task: Task) -> None:
        self.labels = task.test.labels

    def predict(self, task, images, classnames=None):
        return torch.zeros(len(images), len(classnames or task.classnames))


class LooksForEvaluationFeatures(ZeroShot):
    """Zero-shot, but in fit it notes what of the evaluation images it could reach."""

    name = "looks_for_evaluation_features"
    seen: dict = {}

    def fit(self, task: Task) -> None:
        LooksForEvaluationFeatures.seen = {
            "eval_cache": task.eval_cache,
            "keys": [str(k) for k in task.feature_cache],
            "splits_test": task.train_of_seed.__closure__ and [
                c.cell_contents.test for c in task.train_of_seed.__closure__ if hasattr(c.cell_contents, "test")
            ],
        }
        super().fit(task)


@pytest.fixture
def fixtures_registered(monkeypatch):
    for cls in (ReadsTheTestSet, LooksForEvaluationFeatures):
        monkeypatch.setitem(REGISTRY, cls.name, cls)


def test_a_method_that_reads_the_test_set_in_fit_fails(fixtures_registered, tiny, demo_root):
    record = run_method("reads_the_test_set", "demo_colours", 2, tiny)
    assert record["status"] == "failed"
    assert "AttributeError: a Task has no test set" in record["error"]
    assert "top1" not in record


def test_fit_reaches_no_test_features_even_after_other_runs(fixtures_registered, tiny, demo_root):
    """As in a sweep: a first run fills the shared caches with the test features; the next run's fit
    finds them in neither the train-side cache nor an evaluation cache, and its predict still scores."""
    splits = load_datasets(["demo_colours"], Path("unused"))["demo_colours"]
    test = ImageSet(splits.root, "demo_colours", splits.test, tiny.image_size, evaluation=True)
    feature_cache, eval_cache = {}, {}
    for method in ("zero_shot", "looks_for_evaluation_features"):
        (spec,) = build_grid([method], ["demo_colours"], "demo", [2], [1], {tiny.name: tiny.weights}, "fp32", {})
        record = run_one(spec, tiny, splits, test, feature_cache, lambda total, desc: Steps(), None, eval_cache)
        assert record["status"] == "ok", record.get("error")
    assert any(test.key in k for k in eval_cache)  # the first run's test features are cached for evaluation
    seen = LooksForEvaluationFeatures.seen
    assert seen["eval_cache"] is None
    assert not any(test.key in k for k in seen["keys"])
    assert seen["splits_test"] == [[]]  # what other seeds' subsets are drawn from holds no test items
    assert record["top1"] > 0


def test_evaluation_images_are_refused_during_fit(tiny, demo_root):
    splits = load_datasets(["demo_colours"], Path("unused"))["demo_colours"]
    size = tiny.image_size
    task = Task(card=splits.card, classnames=splits.classnames, shots=0, seed=1, backbone=tiny, precision="fp32",
                train=ImageSet(splits.root, "demo_colours", [], size), val=ImageSet(splits.root, "demo_colours", [], size))
    with pytest.raises(RuntimeError, match="during fit"):
        task.frozen_features(ImageSet(splits.root, "demo_colours", splits.test, size, evaluation=True))


def test_each_run_records_its_selection_and_source(tiny, demo_root):
    records = {
        "zero_shot": run_method("zero_shot", "demo_colours", 4, tiny),
        "tip_adapter": run_method("tip_adapter", "demo_colours", 4, tiny),
        "full_val": run_method("tip_adapter", "demo_colours", 4, tiny, sets={"search_split": "full_val"}),
        "no_search": run_method("tip_adapter", "demo_colours", 4, tiny, sets={"search": False}),
        "lp_pp": run_method("lp_pp", "demo_colours", 4, tiny),
    }
    selection = {k: r["config"]["selection"] for k, r in records.items()}
    assert selection == {
        "zero_shot": "fixed recipe",
        "tip_adapter": "few-shot val search over 4000 (alpha, beta) pairs",
        "full_val": "full val search over 4000 (alpha, beta) pairs",
        "no_search": "fixed recipe (the card's initial alpha and beta)",
        "lp_pp": "few-shot val search over 300 iterations (the best kept)",
    }
    assert records["tip_adapter"]["config"]["source"].startswith("gaopengcuhk/Tip-Adapter@")
    assert all("@" in cls.source or cls.source.startswith("none (") for name, cls in REGISTRY.items()
               if cls.__module__.startswith("methods."))
