"""Batch runner against fake ComfyUI servers on 127.0.0.1 (tests/_fake_comfy.py): one server, and several with
one killed mid-sweep."""
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
from rewardlab.batch.runner import BatchRunner, Manifest, ServerSpec, parse_servers
from rewardlab.batch.sweep import expand_runs, parse_assignment

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1)
FAST = dict(request_retry=FAST_RETRY, poll_interval=0.3, probe_interval=0.05)


def seed_runs(spec="1..6", **kw):
    return expand_runs(txt2img_api(**kw), [parse_assignment(f"3.seed={spec}")])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def batch(server_kw, runs, out, concurrency=2, logs=None, progress=False, **kw):
    srv = await FakeComfy(object_info(), **server_kw).start()
    try:
        runner = BatchRunner(srv.url, out, concurrency=concurrency, progress=progress,
                             log=(logs.append if logs is not None else lambda m: None), **FAST, **kw)
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
    assert any("not answering" in m or "lost prompt" in m for m in logs)
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
        runner = BatchRunner(srv.url, out, concurrency=3, progress=False, log=lambda m: None, **FAST)
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

    editor = os.path.join(PACK_ROOT, "example_workflows", "Score and rank a batch with a reward model.json")
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


# --- several servers --------------------------------------------------------------------------------------------

async def cluster(server_kws, runs, out, logs=None, progress=False, **kw):
    servers = [await FakeComfy(object_info(), **skw).start() for skw in server_kws]
    try:
        specs = [ServerSpec(s.url, c) for s, c in zip(servers, kw.pop("concurrencies", [2] * len(servers)))]
        runner = BatchRunner(specs, out, progress=progress, log=(logs.append if logs is not None else lambda m: None),
                             **FAST, **kw)
        records = await runner.run(runs)
    finally:
        for s in servers:
            await s.stop()
    return servers, records, runner


def test_a_killed_server_hands_its_runs_to_the_others(tmp_path):
    """Server B is killed while it runs its fourth prompt. Every run finishes and is recorded once; the live
    server runs each of its runs once; a run whose result died with B (finished there but not yet downloaded)
    is run again on A, which is the only way to get its images."""
    out, logs, runs = str(tmp_path), [], seed_runs("1..12")
    a_kw, b_kw = {"step_delay": 0.01}, {"step_delay": 0.01, "die_after": 3}
    servers, records, runner = run(cluster([a_kw, b_kw], runs, out, logs=logs))
    a, b = servers
    check_complete(records, out)
    assert b.dead and b.started == 4 and len(b.history) == 3
    assert sorted(r["params"]["3.seed"] for r in records) == list(range(1, 13))

    def seeds(srv):
        return [e["prompt"][2]["3"]["inputs"]["seed"] for e in srv.history.values()]

    on_a = [r["params"]["3.seed"] for r in records if r["server"] == a.url]
    on_b = [r["params"]["3.seed"] for r in records if r["server"] == b.url]
    assert sorted(seeds(a)) == sorted(on_a)                     # none twice on the live server
    assert set(on_b) <= set(seeds(b)) and on_b                  # B's finished runs are kept, not rerun
    manifest = Manifest(out).load()
    with open(os.path.join(out, "manifest.jsonl")) as f:
        assert len(f.readlines()) == len(manifest) == 12        # one manifest, one line per run
    assert {m["server"] for m in manifest.values()} == {a.url, b.url}
    assert any("not answering" in m and b.url.split("://")[1] in m for m in logs)


def test_a_dead_cluster_is_reported_within_the_deadline(tmp_path):
    """Both servers die; the runs left are recorded unreachable once no server answered for give_up seconds."""
    out, logs = str(tmp_path), []
    started = __import__("time").monotonic()
    servers, records, runner = run(cluster([{"die_after": 1}, {"die_after": 1}], seed_runs("1..6"), out,
                                           logs=logs, give_up=1.0))
    elapsed = __import__("time").monotonic() - started
    assert runner.gave_up and "no server answered for 1s" in runner.gave_up
    assert elapsed < 6, elapsed          # the deadline plus start-up, not a retry budget per run
    statuses = sorted(r["status"] for r in records)
    assert set(statuses) <= {"success", "unreachable"} and statuses.count("unreachable") >= 4
    assert len(Manifest(out).load()) == 6


def test_runs_go_where_there_is_room(tmp_path):
    """Server A takes 3 at a time, B 1: A, being faster to free, runs more; neither exceeds its concurrency."""
    servers, records, _ = run(cluster([{"step_delay": 0.01}, {"step_delay": 0.01}], seed_runs("1..12"),
                                      str(tmp_path), concurrencies=[3, 1]))
    a, b = servers
    check_complete(records, str(tmp_path))
    assert a.max_in_flight == 3 and b.max_in_flight == 1
    assert len(a.history) > len(b.history) > 0


def test_a_server_without_the_nodes_sits_the_batch_out(tmp_path):
    logs = []
    info = object_info()
    del info["KSampler"]

    async def go():
        lacking = await FakeComfy(info).start()
        good = await FakeComfy(object_info()).start()
        try:
            runner = BatchRunner([lacking.url, good.url], str(tmp_path), progress=False, log=logs.append,
                                 required_nodes={"KSampler", "SaveImage"}, **FAST)
            return lacking, good, await runner.run(seed_runs("1..4"))
        finally:
            await lacking.stop()
            await good.stop()

    lacking, good, records = run(go())
    assert all(r["status"] == "success" and r["server"] == good.url for r in records)
    assert lacking.posts == 0 and any("lacks the nodes ['KSampler']" in m for m in logs)


def test_progress_shows_each_server(tmp_path, capsys):
    run(cluster([{"step_delay": 0.01}, {"step_delay": 0.01, "die_after": 1}], seed_runs("1..4", steps=3),
                str(tmp_path), progress=True))
    err = capsys.readouterr().err
    assert "4/4 runs" in err
    names = [part.split(": ")[0] for part in err.rsplit("\r", 1)[-1].split(" | ")[1:]]
    assert len(names) == 2 and all(n.startswith("127.0.0.1:") for n in names)
    assert "running" in err and " down " in err.replace("down", " down ")


def test_server_lists(tmp_path):
    listing = tmp_path / "servers.txt"
    listing.write_text("# the GPU boxes\nhttp://gpu1:8188 4\nhttp://gpu2:8188/   # default concurrency\n")
    assert parse_servers([str(listing), "http://gpu3:8188"], default_concurrency=2) == [
        ServerSpec("http://gpu1:8188", 4), ServerSpec("http://gpu2:8188", 2), ServerSpec("http://gpu3:8188", 2)]
    with pytest.raises(ValueError, match="listed twice"):
        parse_servers(["http://a:1", "http://a:1/"])
    bad = tmp_path / "bad.txt"
    bad.write_text("http://gpu1:8188 four\n")
    with pytest.raises(ValueError, match="bad.txt:1: concurrency must be a whole number"):
        parse_servers([str(bad)])
    with pytest.raises(ValueError, match="http"):
        parse_servers(["gpu1:8188"])


def test_cli_checks_arguments_before_queueing_anything(tmp_path, capsys):
    """Bad arguments end with one line and status 2 before anything reaches a server (numbers are checked by
    argparse, the rest by cli.check_arguments)."""
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(txt2img_api()))
    listing = tmp_path / "servers.txt"
    listing.write_text("http://127.0.0.1:1 two\n")
    with ThreadedServer() as srv:
        base = [str(wf), "--server", srv.url, "--out", str(tmp_path / "out"), "--no-progress", "--set", "3.seed=1..3"]
        for extra, message in ((["--score", "brightnes"], "unknown reward 'brightnes' for --score"),
                               (["--runs", "missing.csv"], "--runs file 'missing.csv' does not exist"),
                               (["--server", str(listing)], "--server: " + str(listing) + ":1: concurrency must be")):
            assert cli.main(base + extra) == 2
            err = capsys.readouterr().err.strip()
            assert message in err and len(err.splitlines()) == 1, err
        for extra, message in ((["--concurrency", "0"], "--concurrency: must be a finite number >= 1"),
                               (["--give-up", "0"], "--give-up: must be a finite number > 0")):
            with pytest.raises(SystemExit) as exc:
                cli.main(base + extra)
            assert exc.value.code == 2 and message in capsys.readouterr().err
        assert srv.posts == 0


def test_cli_spreads_a_sweep_over_a_server_file(tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(txt2img_api()))
    with ThreadedServer(step_delay=0.01) as a, ThreadedServer(step_delay=0.01) as b:
        listing = tmp_path / "servers.txt"
        listing.write_text(f"{a.url} 1\n{b.url} 1\n")
        code = cli.main([str(wf), "--server", str(listing), "--set", "3.seed=1..6", "--out", str(tmp_path / "out"),
                         "--no-progress", "--poll", "0.3"])
        counts = (len(a.history), len(b.history))
    assert code == 0 and sum(counts) == 6 and min(counts) > 0
    assert "6/6 runs succeeded (" in capsys.readouterr().out


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


def test_report_ranks_a_nan_score_last_and_writes_valid_json(tmp_path):
    """Issue 14 (left over): a NaN score sorted first (NaN compares false) and scores.jsonl held bare NaN, which is
    not JSON. Now NaN ranks last, is written as null and shown as 'NaN'; the files are written atomically."""
    import torch
    from PIL import Image

    from rewardlab.batch.report import score_records, write_report

    records = []
    for key, level in (("dark", 40), ("broken", 0), ("bright", 220)):
        os.makedirs(tmp_path / key)
        Image.new("RGB", (8, 8), (level,) * 3).save(tmp_path / key / "img.png")
        records.append({"key": key, "status": "success", "params": {}, "prompt": {},
                        "outputs": [{"path": os.path.join(key, "img.png")}]})

    class MeanOrNaN:  # a reward that fails (NaN) on an all-black image
        def forward(self, images, prompts):
            mean = images.mean()
            return torch.where(mean == 0, torch.tensor(float("nan")), mean).reshape(1)

    scored = score_records(records, str(tmp_path), MeanOrNaN())
    assert [item["key"] for item in scored] == ["bright", "dark", "broken"]
    write_report(str(tmp_path), scored, "mean")
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]  # strict JSON
    assert [line["score"] is None for line in lines] == [False, False, True]
    assert "mean = NaN" in (tmp_path / "report.html").read_text()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]
