"""Batch runner against a fake ComfyUI server on 127.0.0.1 (tests/_fake_comfy.py)."""
import asyncio
import json
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # pytest runs with --import-mode=importlib
from _batch_fixtures import object_info, txt2img_api
from _fake_comfy import FakeComfy
from rewardlab.batch import cli
from rewardlab.batch.client import RetryPolicy
from rewardlab.batch.runner import BatchRunner, Manifest
from rewardlab.batch.sweep import expand_runs, parse_assignment

FAST_RETRY = RetryPolicy(attempts=12, base_delay=0.05, max_delay=0.4)


def seed_runs(spec="1..6", **kw):
    return expand_runs(txt2img_api(**kw), [parse_assignment(f"3.seed={spec}")])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def batch(server_kw, runs, out, concurrency=2, logs=None, progress=False, **kw):
    srv = await FakeComfy(object_info(), **server_kw).start()
    try:
        runner = BatchRunner(srv.url, out, concurrency=concurrency, retry=FAST_RETRY, poll_interval=0.3,
                             progress=progress, log=(logs.append if logs is not None else lambda m: None), **kw)
        records = await runner.run(runs)
    finally:
        await srv.stop()
    return srv, records


def check_complete(records, out):
    for rec in records:
        assert rec["status"] == "success", rec
        assert rec["prompt_id"] and rec["key"] and rec["params"] and rec["prompt"]
        assert rec["timings"]["submitted"] and rec["timings"]["finished"] >= rec["timings"]["submitted"]
        assert rec["outputs"], rec
        for o in rec["outputs"]:
            assert os.path.getsize(os.path.join(out, o["path"])) > 0


def test_concurrency_is_bounded(tmp_path):
    for limit in (1, 3):
        srv, records = run(batch({"step_delay": 0.01}, seed_runs("1..8"), str(tmp_path / str(limit)),
                                 concurrency=limit))
        assert srv.max_in_flight == limit  # reached, never exceeded
        assert len(srv.executed) == 8
        check_complete(records, str(tmp_path / str(limit)))


def test_manifest_complete_and_resume_skips_finished(tmp_path):
    out = str(tmp_path)
    srv, first = run(batch({}, seed_runs("1..4"), out))
    check_complete(first, out)
    assert [r["params"]["3.seed"] for r in first] == [1, 2, 3, 4]
    manifest = Manifest(out).load()
    assert set(manifest) == {r.key for r in seed_runs("1..4")}
    # a rerun with a larger sweep only submits the new runs
    srv, second = run(batch({}, seed_runs("1..6"), out))
    assert srv.posts == 2
    assert sorted(r["params"]["3.seed"] for r in second) == [1, 2, 3, 4, 5, 6]
    check_complete(second, out)
    with open(os.path.join(out, "manifest.jsonl")) as f:
        assert len(f.readlines()) == 6  # one line per finished run, none duplicated


def test_restart_and_websocket_drops_lose_nothing(tmp_path):
    out, logs = str(tmp_path), []
    srv, records = run(batch({"restart_after": 3, "drop_ws_every": 5, "step_delay": 0.01}, seed_runs("1..6"), out,
                             logs=logs))
    assert srv.restarts == 1 and srv.ws_drops >= 1
    check_complete(records, out)
    assert sorted(r["params"]["3.seed"] for r in records) == [1, 2, 3, 4, 5, 6]
    assert any(r["attempts"] > 1 for r in records)  # the prompts the restart forgot were resubmitted
    assert any("lost prompt" in m for m in logs)
    assert len(Manifest(out).load()) == 6


def test_node_errors_are_reported(tmp_path):
    logs = []
    runs = seed_runs("[-1, 2]")
    srv, records = run(batch({}, runs, str(tmp_path), logs=logs))
    bad, good = records
    assert bad["status"] == "invalid" and good["status"] == "success"
    errors = bad["node_errors"]["3"]["errors"]
    assert errors[0]["type"] == "value_smaller_than_min" and errors[0]["details"] == "seed"
    text = "\n".join(logs)
    assert "node 3 (KSampler 'Sampler'): Value -1 smaller than min of 0 [seed]" in text
    assert Manifest(str(tmp_path)).load()[bad["key"]]["status"] == "invalid"


def test_execution_error_is_recorded_and_retried_on_rerun(tmp_path):
    out, logs = str(tmp_path), []
    fail = lambda prompt: ("3", "CUDA out of memory (fake)") if prompt["3"]["inputs"]["seed"] == 3 else None
    srv, records = run(batch({"fail": fail}, seed_runs("1..4"), out, logs=logs))
    by_seed = {r["params"]["3.seed"]: r for r in records}
    assert by_seed[3]["status"] == "error"
    assert by_seed[3]["error"]["node_id"] == "3" and "out of memory" in by_seed[3]["error"]["exception_message"]
    assert all(by_seed[s]["status"] == "success" for s in (1, 2, 4))
    assert any("execution error in node 3 (KSampler)" in m for m in logs)
    srv, again = run(batch({}, seed_runs("1..4"), out))
    assert srv.posts == 1  # only the failed run is submitted again
    check_complete(again, out)


def test_interrupt_keeps_finished_runs(tmp_path):
    """Cancelling the runner (what Ctrl-C does under asyncio.run) keeps every run finished so far."""
    out = str(tmp_path)

    async def interrupted():
        srv = await FakeComfy(object_info(), step_delay=0.01).start()
        runner = BatchRunner(srv.url, out, concurrency=3, retry=FAST_RETRY, poll_interval=0.3, progress=False,
                             log=lambda m: None)
        task = asyncio.create_task(runner.run(seed_runs("1..8")))
        while len(Manifest(out).load()) < 3:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pending_after = len(srv.queue)  # our queued prompts were taken off the server's queue
        await srv.stop()
        return pending_after

    assert run(interrupted()) == 0
    kept = Manifest(out).load()
    assert 3 <= len(kept) < 8 and all(r["status"] == "success" for r in kept.values())
    srv, records = run(batch({}, seed_runs("1..8"), out, concurrency=3))
    assert srv.posts == 8 - len(kept)
    check_complete(records, out)


class ThreadedServer:
    """The fake server on its own event loop thread, for code that calls asyncio.run itself (the CLI)."""

    def __init__(self, **kw):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.kw = kw

    def __enter__(self):
        self.thread.start()
        self.srv = asyncio.run_coroutine_threadsafe(FakeComfy(object_info(), **self.kw).start(), self.loop).result(10)
        return self.srv

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.srv.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_cli_sweep_and_score_report(tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(txt2img_api()))
    out = tmp_path / "out"
    with ThreadedServer() as srv:
        code = cli.main([str(wf), "--server", srv.url, "--set", "Sampler.seed=[2,9,5]", "--set", "cfg=[4, 6]",
                         "--zip", "--concurrency", "2", "--out", str(out), "--score", "brightness", "--no-progress",
                         "--poll", "0.3"])
        assert code == 2  # --zip with axes of lengths 3 and 2 is refused with a clear message
        assert "equal length" in capsys.readouterr().err
        code = cli.main([str(wf), "--server", srv.url, "--set", "Sampler.seed=[2,9,5]", "--set", "cfg=[4, 6]",
                         "--concurrency", "2", "--out", str(out), "--score", "brightness", "--no-progress",
                         "--poll", "0.3"])
    assert code == 0
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 6
    # the fake server paints seed s at brightness (s % 10) / 9: ranking by brightness orders the seeds
    assert [s["params"]["Sampler.seed"] for s in scores[::2]] == [9, 5, 2]
    assert scores[0]["score"] == pytest.approx(1.0, abs=1e-3)
    html = (out / "report.html").read_text()
    assert html.index(scores[0]["path"]) < html.index(scores[-1]["path"])
    assert "a red apple" in html


def test_progress_bar_follows_runs_and_node_steps(tmp_path, capsys):
    run(batch({}, seed_runs("1..2", steps=4), str(tmp_path), concurrency=1, progress=True))
    err = capsys.readouterr().err
    assert "[" + "#" * 24 + "] 2/2 runs" in err        # the bar fills as runs finish
    assert "node 3 4/4" in err                          # websocket 'progress' of the sampler node


def test_rewardlab_run_subcommand_exit_status(tmp_path, capsys):
    """``rewardlab run`` (the console script's subcommand) exits non-zero when a run fails."""
    from rewardlab import cli as rewardlab_cli

    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(txt2img_api()))
    with ThreadedServer() as srv:
        base = ["run", str(wf), "--server", srv.url, "--out", str(tmp_path / "out"), "--no-progress", "--poll", "0.3"]
        assert rewardlab_cli.main(base + ["--set", "3.seed=[1, 2]"]) == 0
        with pytest.raises(SystemExit) as exc:
            rewardlab_cli.main(base + ["--set", "3.seed=-1"])
    assert exc.value.code == 1
    assert "Value -1 smaller than min of 0 [seed]" in capsys.readouterr().err


def test_cli_runs_an_editor_workflow(tmp_path):
    """An editor-format file is converted with the server's /object_info, then swept by title."""
    from rewardlab.batch.validate import PACK_ROOT

    editor = os.path.join(PACK_ROOT, "example_workflows", "score_and_rank.json")
    out = tmp_path / "out"
    with ThreadedServer() as srv:
        code = cli.main([editor, "--server", srv.url, "--set", "Load Checkpoint.ckpt_name=tiny.safetensors",
                         "--set", "KSampler.seed=3..4", "--out", str(out), "--no-progress", "--poll", "0.3"])
        submitted = [h["prompt"][2] for h in srv.history.values()]
    assert code == 0

    def inputs_of(prompt, class_type, title=None):
        return next(n["inputs"] for n in prompt.values() if n["class_type"] == class_type
                    and (title is None or n["_meta"]["title"] == title))

    assert sorted(inputs_of(p, "KSampler")["seed"] for p in submitted) == [3, 4]
    for p in submitted:  # the PrimitiveNode's prompt reached both the text encoder and the ranking node
        assert inputs_of(p, "RewardLabRankImages")["prompts"] == inputs_of(p, "CLIPTextEncode", "Positive")["text"]
    assert len(Manifest(str(out)).load()) == 2


@pytest.mark.parametrize("extra, says", [
    (["--score", "brigthness"], "unknown reward 'brigthness' for --score; choose one of"),
    (["--score", "aesthetic-v2", "--reward-folder", "."], "no clip weights found"),
    (["--set", "3.seed=9..1"], "start is above end"),
    (["--runs", "missing.csv"], "--runs file 'missing.csv' does not exist"),
])
def test_cli_checks_every_argument_before_the_first_request(tmp_path, capsys, monkeypatch, extra, says):
    """Issue 14: `--score <typo>` ran the whole sweep, then printed a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REWARDLAB_MODELS", raising=False)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(txt2img_api()))
    with ThreadedServer() as srv:
        seen = []
        monkeypatch.setattr(cli, "fetch_object_info", lambda *a: seen.append(a))
        code = cli.main([str(wf), "--server", srv.url, "--out", str(tmp_path / "out"), "--no-progress", *extra])
        posts = srv.posts
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and says in err[-1] and err[-1].startswith("rewardlab run: error: ") and len(err) == 1
    assert seen == [] and posts == 0 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, says", [
    ("--concurrency", "0", "argument --concurrency: must be a finite number >= 1, got 0"),
    ("--timeout", "-5", "argument --timeout: must be a finite number > 0.0"),
    ("--poll", "nan", "argument --poll: must be a finite number > 0.0"),
    ("--server", "localhost:8188", "argument --server: 'localhost:8188' is not an http(s) URL"),
])
def test_cli_argument_mistakes_exit_2_with_one_line(tmp_path, capsys, flag, value, says):
    """Issue 14: `--concurrency 0` printed a traceback."""
    from rewardlab import cli as rewardlab_cli

    args = ["run", str(tmp_path / "wf.json"), "--server", "http://127.0.0.1:9", flag, value]
    with pytest.raises(SystemExit) as exc:
        rewardlab_cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and says in err[-1] and "Traceback" not in "\n".join(err)
