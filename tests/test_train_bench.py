"""The training benchmarks run end to end on CPU: bench/draft_step.py with --tiny (one JSON record per measurement,
each prefix mode with its memory; on the CPU the CUDA-graph mode says it fell back to the eager prefix), and
bench/draft_paper.py on one step."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

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


def test_draft_paper_bench_smoke(tmp_path):
    """bench/draft_paper.py: one method, one step, one seed; writes its JSON and plot into the given folder."""
    path = Path(__file__).resolve().parents[1] / "bench" / "draft_paper.py"
    spec = importlib.util.spec_from_file_location("draft_paper_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--steps", "1", "--eval-every", "1", "--seeds", "0", "--methods", "DRaFT-1",
                             "--no-diagnostics", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [r["method"] for r in result["runs"]] == ["DRaFT-1"] and result["runs"][0]["step"] == [0, 1]
    saved = json.loads((tmp_path / "draft_paper.json").read_text())
    assert saved["summary"]["DRaFT-1"]["final_heldout"] == result["runs"][0]["heldout_reward"][-1]
    assert (tmp_path / "draft_paper.png").stat().st_size > 1000
