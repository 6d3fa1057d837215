"""A tiny in-process registry of training runs, read by the ``GET /rewardlab/training`` route.

A trainer makes a fresh run id for every training run and calls ``start(run_id, name=...)`` once: that drops
what earlier runs of the same name (the LoRA's name) left, so a reused name starts from a clean status. Then
``update(run_id, step=..., total=..., reward=..., last_checkpoint=...)`` (any JSON-able fields; ``record=`` a step
log dict is unpacked into its numbers) and ``finish(run_id, status=...)``. ``latest(name)`` finds a run by name.
Thread-safe: ComfyUI runs nodes in a worker thread while the server reads from its event loop.
"""
import copy
import math
import threading
import time

DEFAULT_RUN = "default"
_LOCK = threading.Lock()
_RUNS = {}


def _plain(value):
    """JSON-safe copies: floats stay floats (NaN/Inf -> None), tensors/numpy scalars -> Python numbers."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def start(run_id, name=None, **fields):
    """A new run: a clean status under ``run_id``; earlier runs called ``name`` are dropped."""
    run_id = str(run_id)
    with _LOCK:
        for old in [rid for rid, e in _RUNS.items() if name is not None and e.get("name") == name]:
            del _RUNS[old]
        _RUNS[run_id] = {"run_id": run_id, "name": name, "started": time.time(), "status": "running"}
    update(run_id, **fields)


def latest(name):
    """The status of the most recent run called ``name`` (None if there is none)."""
    with _LOCK:
        runs = [e for e in _RUNS.values() if e.get("name") == name]
        return copy.deepcopy(max(runs, key=lambda e: e["started"])) if runs else None


def update(run_id=None, **fields):
    """Merge ``fields`` into the status of ``run_id`` (default run when None) and stamp the time."""
    record = fields.pop("record", None)
    if isinstance(record, dict):
        fields = {**{k: v for k, v in record.items() if isinstance(v, (int, float)) or v is None}, **fields}
    run_id = str(run_id or DEFAULT_RUN)
    with _LOCK:
        entry = _RUNS.setdefault(run_id, {"run_id": run_id, "started": time.time()})
        entry.update(_plain(fields))
        entry["updated"] = time.time()


def finish(run_id=None, status="completed", **fields):
    update(run_id, status=status, **fields)


def snapshot(run_id=None):
    """A deep copy: {run_id: status} for all runs, or one run's status (None if unknown)."""
    with _LOCK:
        if run_id is not None:
            return copy.deepcopy(_RUNS.get(str(run_id)))
        return copy.deepcopy(_RUNS)


def clear(run_id=None):
    with _LOCK:
        if run_id is None:
            _RUNS.clear()
        else:
            _RUNS.pop(str(run_id), None)
