"""What a run record must hold before the store takes it from outside the process (a worker's JSON
file, a record someone sent, a file left in a records folder).

A record is checked field by field against the run record the runner writes: the status in its
set, top-1 a finite percentage, names, shots, seeds and hashes in their formats and ranges, every
size bounded, and its config hash equal to the hash of its own config (so a number cannot be filed
under another run's identity). `record_problems` returns what is wrong, in words; empty: valid.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

from harness.cost import CPU_BASIS, CUDA_BASIS, PROCESS_BASIS
from harness.grid import config_hash_of
from harness.protocols import protocols

MAX_RECORD_BYTES = 2_000_000  # a real record is a few kB (a long traceback included)
STATUSES = ("ok", "failed")
EVAL_STATUSES = ("ok", "not_applicable")
PRECISIONS = ("fp32", "bf16", "fp16")
MEMORY_BASES = (CUDA_BASIS, CPU_BASIS, PROCESS_BASIS)
HASH = re.compile(r"[0-9a-f]{16}")
RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
NAME = re.compile(r"[A-Za-z0-9_.:+/@-]{1,128}")
MAX_TEXT = 100_000
MAX_EVALUATIONS = 1_000
# the stored config's fields that must say what the record's columns say
SAME_AS_CONFIG = ("method", "dataset", "suite", "backbone", "weights", "shots", "seed", "precision")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percentage(value, what: str, required: bool) -> list[str]:
    if value is None:
        return [f"{what} is missing"] if required else []
    if not _is_number(value) or not 0 <= value <= 100:
        return [f"{what} is {value!r}, not a finite percentage in [0, 100]"]
    return []


def _timestamp(value, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (str, datetime)):
        return [f"{what} is {type(value).__name__}, not an ISO timestamp"]
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return [f"{what} '{value[:40]}' is not an ISO timestamp"]
    return []


def _evaluation_problems(evaluations) -> list[str]:
    if evaluations is None:
        return []
    if not isinstance(evaluations, list) or len(evaluations) > MAX_EVALUATIONS:
        return [f"evaluations must be a list of at most {MAX_EVALUATIONS} targets"]
    problems = []
    for i, e in enumerate(evaluations):
        if not isinstance(e, dict):
            return [f"evaluations[{i}] is not an object"]
        if e.get("status") not in EVAL_STATUSES:
            problems.append(f"evaluations[{i}].status is {e.get('status')!r}, not one of {', '.join(EVAL_STATUSES)}")
        if not isinstance(e.get("target"), str) or not NAME.fullmatch(e["target"]):
            problems.append(f"evaluations[{i}].target is {str(e.get('target'))[:40]!r}, not a name")
        problems += _percentage(e.get("top1"), f"evaluations[{i}].top1", e.get("status") == "ok")
        for key in ("n_test", "n_classes"):
            if e.get(key) is not None and (not _is_int(e[key]) or e[key] < 0):
                problems.append(f"evaluations[{i}].{key} is {e[key]!r}, not a count")
    return problems


def record_problems(record) -> list[str]:
    """Everything that keeps `record` (parsed JSON) from being stored, in words; [] when valid."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = []
    if record.get("status") not in STATUSES:
        problems.append(f"status is {str(record.get('status'))[:40]!r}, not one of {', '.join(STATUSES)}")
    config_hash = record.get("config_hash")
    if not isinstance(config_hash, str) or not HASH.fullmatch(config_hash):
        problems.append(f"config_hash {str(config_hash)[:40]!r} is not 16 hexadecimal digits")
    if not isinstance(record.get("run_id"), str) or not RUN_ID.fullmatch(record["run_id"]):
        problems.append(f"run_id {str(record.get('run_id'))[:40]!r} is not an id")
    for key in ("db_id", "sweep_id", "replaces"):  # whose database and sweep, which stored run a --force rerun replaces
        if record.get(key) is not None and (not isinstance(record[key], str) or not RUN_ID.fullmatch(record[key])):
            problems.append(f"{key} {str(record[key])[:40]!r} is not an id")
    for key in ("method", "dataset", "suite", "backbone"):
        if not isinstance(record.get(key), str) or not NAME.fullmatch(record[key]):
            problems.append(f"{key} {str(record.get(key))[:40]!r} is not a name (letters, digits, _.:+/@-, at most 128)")
    if not _is_int(record.get("shots")) or not 0 <= record["shots"] <= 10_000:
        problems.append(f"shots is {record.get('shots')!r}, not an integer in 0..10000")
    if not _is_int(record.get("seed")) or not 0 <= record["seed"] < 2**31:
        problems.append(f"seed is {record.get('seed')!r}, not an integer in 0..2^31-1")
    if record.get("precision") is not None and record["precision"] not in PRECISIONS:
        problems.append(f"precision is {str(record['precision'])[:20]!r}, not one of {', '.join(PRECISIONS)}")
    fewshot = record.get("protocol") in (None, "fewshot")
    problems += _percentage(record.get("top1"), "top1", record.get("status") == "ok" and fewshot)
    if record.get("status") == "failed" and record.get("top1") is not None:
        problems.append("a failed run carries a top1")
    for key in ("n_test", "trainable_params"):
        if record.get(key) is not None and (not _is_int(record[key]) or record[key] < 0):
            problems.append(f"{key} is {record[key]!r}, not a count")
    if record.get("memory_basis") is not None and record["memory_basis"] not in MEMORY_BASES:
        problems.append(f"memory_basis is {str(record['memory_basis'])[:40]!r}, not one of {', '.join(MEMORY_BASES)}")
    for key in ("train_seconds", "eval_seconds", "peak_mem_mb", "machine_load"):
        if record.get(key) is not None and (not _is_number(record[key]) or record[key] < 0):
            problems.append(f"{key} is {record[key]!r}, not a finite non-negative number")
    for key in ("started_at", "finished_at"):
        problems += _timestamp(record.get(key), key)
    for key, value in record.items():
        if isinstance(value, str) and len(value) > MAX_TEXT:
            problems.append(f"{key} holds {len(value):,} characters (at most {MAX_TEXT:,})")
    problems += _evaluation_problems(record.get("evaluations"))
    config = record.get("config")
    if not isinstance(config, dict):
        problems.append("config is not an object")
    elif isinstance(config_hash, str) and HASH.fullmatch(config_hash):
        if config_hash_of(config) != config_hash:
            problems.append(f"config_hash {config_hash} is not the hash of the record's own config ({config_hash_of(config)}): "
                            "the number would be filed under another run's identity")
        differ = [k for k in SAME_AS_CONFIG if k in config and k in record and config[k] != record[k]]
        if differ:
            problems.append(f"{', '.join(differ)} differ between the record and its config")
    if isinstance(config, dict) and "recipe" in config and config["recipe"] not in protocols():
        problems.append(f"config's recipe {str(config['recipe'])[:40]!r} is not a protocol ({', '.join(protocols())})")
    return problems
