"""bench/guidance.py runs end to end (tiny architecture; 2 steps) and reports consistent counts."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_reports_evaluations(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_guidance", os.path.join(ROOT, "bench", "guidance.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # an empty folder: the bench falls back to the tiny architecture with random weights
    monkeypatch.setattr(sys, "argv", ["guidance.py", "--steps", "3", "--batch", "1", "--device", "cpu",
                                      "--tiny-path", str(tmp_path), "--threshold", "-1"])
    bench.main()
    out = json.loads(capsys.readouterr().out)
    assert out["constant_cfg"]["evaluations_per_image"] == 6
    assert out["adaptive"]["latched_at_step"] == 0                  # threshold -1: latches at the first comparison
    assert out["adaptive"]["evaluations_per_image"] == 2 + 1 + 1
    assert out["evaluations_saved"] == round(1 - 4 / 6, 4) and out["target_met"]
