"""bench/gpu_run.py, the one-call GPU run: every phase's JSON lines reach results.jsonl as they are printed, a phase
past its limit is stopped with what it printed kept, a failure carries its log, the budget skips what cannot start,
the full run keeps the issue's priority order, and the summary sets the best mode beside TRL and the targets."""
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run_bench", BENCH / "gpu_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def py(code):
    return [sys.executable, "-c", code]


def test_phases_stream_rows_stop_at_their_limit_and_report_failures(gpu_run, tmp_path):
    rec = gpu_run.Recorder(str(tmp_path))
    deadline = time.monotonic() + 60
    fast = gpu_run.Phase("fast", py('import json; print(json.dumps({"what": "x", "v": 1})); print("chatter")'), 30, 0)
    slow = gpu_run.Phase("slow", py('import json, time; print(json.dumps({"what": "y"}), flush=True); '
                                    'time.sleep(60)'), 2, 0)
    bad = gpu_run.Phase("bad", py('import sys; sys.stderr.write("boom\\n"); sys.exit(3)'), 30, 0)
    late = gpu_run.Phase("late", py("pass"), 30, 20)
    assert gpu_run.run_phase(fast, rec, deadline) == "ok"
    assert gpu_run.run_phase(slow, rec, deadline) == "timeout"
    assert gpu_run.run_phase(bad, rec, deadline) == "failed"
    assert gpu_run.run_phase(late, rec, time.monotonic() + 5) == "skipped"
    rows = rec.rows()
    assert {"phase": "fast", "what": "x", "v": 1} in rows
    assert {"phase": "slow", "what": "y"} in rows                 # printed before the limit: kept
    status = {r["phase"]: r for r in rows if r["what"] == "phase"}
    assert status["fast"]["status"] == "ok" and status["slow"]["s"] < 20
    assert status["bad"]["rc"] == 3 and "boom" in status["bad"]["log_tail"]
    assert status["late"]["status"] == "skipped"
    assert "chatter" in (tmp_path / "log.txt").read_text()


def test_full_run_keeps_the_priority_order_and_every_phase_runs_a_bench_script(gpu_run, monkeypatch):
    monkeypatch.setattr(gpu_run, "comfyui_path", lambda: "/a/ComfyUI")
    full = gpu_run.phases(check=False, tiny=False, device="cuda")
    names = [p.name for p in full]
    assert names[:4] == ["draft_ours_eager", "draft_trl", "draft_ours_levers", "reno_eager"]
    assert names[-5:] == ["comfy_step", "family_steps", "draft_ours_single_levers", "lora_cost", "reno_compiled"]
    levers = full[2].argv
    assert levers[levers.index("--modes") + 1:levers.index("--modes") + 2] == ["compile+cudagraphs"]
    for phase in full + gpu_run.phases(check=True, tiny=True, device="cpu"):
        assert Path(phase.argv[1]).is_file(), phase
    check = gpu_run.phases(check=True, tiny=False, device="cpu")
    assert "compile+cudagraphs" not in check[1].argv            # no inductor wait on a CPU check
    check = gpu_run.phases(check=True, tiny=False, device="cuda")
    assert [p.name for p in check][:2] == ["imports", "draft_levers_tiny"] and "compile+cudagraphs" in check[1].argv
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_run.sh")]).returncode == 0


def test_summary_sets_the_best_mode_beside_trl_and_the_targets(gpu_run, tmp_path):
    rec = gpu_run.Recorder(str(tmp_path))
    step = dict(what="rewardlab_step", B=4, method="draft_k", K=1)
    rec.row(**step, mode="eager", min_s=3.0, peak_GiB=14.0)
    rec.row(**step, mode="compile+cudagraphs", min_s=1.25, peak_GiB=15.0, prefix_rel_err=0.004)
    rec.row(**step, mode="compile", error="OOM")
    rec.row(what="trl_anchor_step", B=4, K=1, min_s=5.0, peak_GiB=20.0)
    rec.row(what="reno", row="rewardlab", compile="none", s_per_image=6.0, peak_gib=8.0)
    gpu_run.summary(rec)
    draft = next(r for r in rec.rows() if r["what"] == "summary_draft1")
    assert draft["best_mode"] == "compile+cudagraphs" and draft["meets_time"] and draft["meets_memory"]
    assert draft["speedup_vs_trl"] == pytest.approx(4.0) and draft["eager_speedup_vs_trl"] == pytest.approx(5 / 3)
    assert draft["memory_ratio_vs_trl"] == pytest.approx(0.75) and set(draft["modes"]) == {"eager",
                                                                                          "compile+cudagraphs"}
    reno = next(r for r in rec.rows() if r["what"] == "summary_reno")
    assert not reno["meets_time"] and reno["meets_memory"]
