"""bench/draft_step.py runs end to end on CPU with --tiny and prints one JSON record per measurement (each prefix
mode, with its memory); on the CPU the CUDA-graph mode says it fell back to the eager prefix."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "draft_step.py"


@pytest.mark.filterwarnings("ignore:cuda_graphs is on but the model is on cpu")
def test_draft_step_bench_tiny_smoke(capsys):
    spec = importlib.util.spec_from_file_location("draft_step_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--reps", "1", "--batches", "2", "--ks", "50", "--steps", "3", "--no-trl",
                "--modes", "eager", "cudagraphs"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = [r for r in records if r["what"] == "rewardlab_step"]
    assert [(r["method"], r["K"], r["mode"]) for r in steps] == [
        (m, k, mode) for m, k in [("draft_k", 3), ("draft_lv", 1)] for mode in ("eager", "cudagraphs")]
    assert all(r["min_s"] > 0 and r["B"] == 2 and r["growth_GiB"] >= 0 and r["peak_GiB"] > 0 for r in steps)
    assert all(("fell_back" in r) == (r["mode"] == "cudagraphs") for r in steps)
