"""Few-shot subsets read from files the user already has (`harness run --splits DIR`).

Two formats, looked up under `DIR/<dataset folder>/split_fewshot/`:

- CoOp's cache `shot_{K}-seed_{S}.pkl`: a pickle of `{"train": [Datum], "val": [Datum]}` (ImageNet:
  train only). A pickle is untrusted input, so it is read with an unpickler that builds only
  Dassl's `Datum` record (as a plain stand-in) and plain containers; anything else is refused.
- FarinaMatteo/rethinking_fewshot_vlms' `shot_{K}-seed_{S}_{train,val}.jsonl`: one Dassl
  `Datum.__dict__` per line (`_impath`, `_label`, `_domain`, `_classname`); ImageNet: train only.

`_impath` is absolute (CoOp) or relative to the data root (2SFS); either way it is matched to the
dataset's own images by its trailing path components, so the files work wherever the data lives.
Where a file has no val subset (ImageNet), the val subset is drawn as the `coop` sampler does:
min(K, 4) per label from the train images not chosen, after `random.seed(seed)`.
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import json
import pickle
import random
from pathlib import Path, PurePath

from harness.data.fewshot import Manifest, val_from_rest
from harness.data.readers import DatasetSplits, Item
from harness.errors import DataError

DATUM_MODULES = ("dassl.data.datasets.base_dataset", "datasets.utils")  # Dassl's, and CLIP-LoRA's copy


class Datum:
    """Stand-in for Dassl's Datum: only its attributes are kept."""


class DatumUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name == "Datum" and module in DATUM_MODULES:
            return Datum
        if (module, name) == ("copyreg", "_reconstructor"):  # pickle protocols 0 and 1
            return copyreg._reconstructor
        if (module, name) == ("builtins", "object"):
            return object
        raise pickle.UnpicklingError(f"it asks for '{module}.{name}', which a few-shot split file never contains")


def split_files(folder: Path, shots: int, seed: int) -> list[Path]:
    """The files that hold this subset, in either format; [] when there are none."""
    base = folder / "split_fewshot"
    pkl = base / f"shot_{shots}-seed_{seed}.pkl"
    if pkl.is_file():
        return [pkl]
    train = base / f"shot_{shots}-seed_{seed}_train.jsonl"
    val = base / f"shot_{shots}-seed_{seed}_val.jsonl"
    return [train] + ([val] if val.is_file() else []) if train.is_file() else []


def _records_from_pickle(path: Path, data: bytes) -> dict[str, list[dict]]:
    try:
        raw = DatumUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"Split file {path} is refused: {exc}. Only CoOp's {{'train': [Datum], 'val': [Datum]}} is read.") from None
    except Exception as exc:  # noqa: BLE001 - any other failure means a damaged file
        raise DataError(f"Split file {path} is not a readable pickle ({type(exc).__name__}: {exc}).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), list):
        raise DataError(f"Split file {path} does not hold {{'train': [Datum, ...], 'val': [...]}}.")
    out = {}
    for key in ("train", "val"):
        rows = raw.get(key) or []
        if not all(isinstance(r, Datum) for r in rows):
            raise DataError(f"Split file {path}: '{key}' must be a list of Datum records.")
        out[key] = [vars(r) for r in rows]
    return out


def _records_from_jsonl(path: Path, data: bytes) -> list[dict]:
    rows = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"Split file {path}:{n} is not JSON ({exc}).") from None
        if not isinstance(row, dict):
            raise DataError(f"Split file {path}:{n} must be an object with _impath, _label, _classname.")
        rows.append(row)
    return rows


def _items(path: Path, rows: list[dict], splits: DatasetSplits, known: dict[str, Item]) -> list[Item]:
    n_classes = len(splits.classnames)
    items = []
    for n, row in enumerate(rows, 1):
        impath, label = row.get("_impath"), row.get("_label")
        if not isinstance(impath, str) or isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"Split file {path}, entry {n}: needs a string _impath and an integer _label, got {row!r}.")
        if not 0 <= label < n_classes:
            raise DataError(f"Split file {path}, entry {n}: label {label} is out of range (the dataset has labels 0..{n_classes - 1}).")
        parts = PurePath(impath.replace("\\", "/")).parts
        item = next((known[s] for s in ("/".join(parts[i:]) for i in range(len(parts))) if s in known), None)
        if item is None:
            raise DataError(
                f"Split file {path}, entry {n}: image '{impath}' is not found among {splits.card.name}'s images "
                f"under {splits.root}. Are the files for this dataset and this data root?"
            )
        if item.label != label:
            raise DataError(f"Split file {path}, entry {n}: '{impath}' has label {label}, but {item.label} in the dataset's split.")
        items.append(item)
    return items


def check_counts(path: Path, items: list[Item], k: int, available: list[Item], classnames: list[str], what: str,
                 at_most: bool = False) -> None:
    """Refuse a file whose subset is not the K-shot subset its name says: per class exactly K distinct
    images (at most K for a val subset); a class with fewer than K images in the dataset either keeps
    them all (Dassl master) or is padded to K by repeating its own images (CLIP-LoRA's and 2SFS's
    `repeat=True`). Duplicates anywhere else mean the file was not drawn by either sampler."""
    per_class: dict[int, list[Item]] = {}
    for it in items:
        per_class.setdefault(it.label, []).append(it)
    have: dict[int, int] = {}
    for it in available:
        have[it.label] = have.get(it.label, 0) + 1
    for label, chosen in sorted(per_class.items()):
        n, distinct, pool = len(chosen), len(set(chosen)), have.get(label, 0)
        kept_whole = pool < k and n == distinct == pool
        padded = pool < k and n == k and distinct == pool
        exact = n == distinct and (n <= k if at_most else n == k)
        if not (exact or kept_whole or padded):
            expected = f"at most {k}" if at_most else f"{k}"
            repeats = f", {n - distinct} of them repeated" if distinct < n else ""
            raise DataError(
                f"Split file {path}: class {label} ({classnames[label]}) has {n} {what} images{repeats}; a {k}-shot "
                f"{what} subset holds {expected} distinct images per class (the class has {pool} in the dataset; fewer "
                f"only where it has fewer than {k}). Is the file for this shot count?"
            )


def read_split_files(splits: DatasetSplits, splits_dir: Path, shots: int, seed: int) -> tuple[Manifest, str]:
    """The subset in the files for (dataset, K, seed), validated, and the files' sha256."""
    folder = Path(splits_dir) / splits.card.folder
    files = split_files(folder, shots, seed)
    if not files:
        raise DataError(
            f"No few-shot split file for {splits.card.name} {shots}-shot seed {seed} under {folder / 'split_fewshot'} "
            f"(expected shot_{shots}-seed_{seed}.pkl or shot_{shots}-seed_{seed}_train.jsonl)."
        )
    digest = hashlib.sha256()
    known = {it.path: it for it in splits.train + splits.val}
    if files[0].suffix == ".pkl":
        data = files[0].read_bytes()
        digest.update(data)
        records = _records_from_pickle(files[0], data)
        train = _items(files[0], records["train"], splits, known)
        val = _items(files[0], records["val"], splits, known)
    else:
        parts = []
        for f in files:
            data = f.read_bytes()
            digest.update(hashlib.sha256(data).digest())
            parts.append(_items(f, _records_from_jsonl(f, data), splits, known))
        train, val = parts[0], parts[1] if len(parts) > 1 else []
    missing = sorted(set(range(len(splits.classnames))) - {it.label for it in train})
    if missing:
        names = ", ".join(f"{c} ({splits.classnames[c]})" for c in missing[:5])
        raise DataError(f"Split file {files[0]}: no training image for class {names}{' ...' if len(missing) > 5 else ''}.")
    check_counts(files[0], train, shots, splits.train, splits.classnames, "training")
    if val:
        check_counts(files[-1], val, min(shots, 4), splits.val or splits.train, splits.classnames, "val", at_most=True)
        both = set(train) & set(val)
        if both:
            raise DataError(f"Split file {files[-1]}: '{next(iter(both)).path}' is also a training image in {files[0].name} "
                            f"({len(both)} such images); a val image must be held out.")
    if not val:
        random.seed(seed)
        val = val_from_rest(splits, train, min(shots, 4))
    source = f"files {', '.join(f.name for f in files)}"
    return Manifest(splits.card.name, shots, seed, train, val, source), digest.hexdigest()
