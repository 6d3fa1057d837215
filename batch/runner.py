"""Run a list of prompts on a ComfyUI server: bounded concurrency, progress, outputs, manifest, resume.

Each run is submitted to ``POST /prompt`` under a prompt id we choose, followed over the websocket, and confirmed
through ``/history`` (the websocket may drop messages, so ``/history`` + ``/queue`` are polled as a safety net).
A prompt that the server no longer knows (neither queued nor in history, e.g. after a restart) is resubmitted.
Every finished run is appended to ``manifest.jsonl`` and flushed to disk at once, so an interrupt (Ctrl-C) loses
nothing finished, and a rerun skips runs whose key already succeeded.
"""
import asyncio
import json
import os
import sys
import time
import uuid

import aiohttp

from .client import ComfyClient, PromptRejected, RetryPolicy, ServerUnavailable, format_rejection

MANIFEST = "manifest.jsonl"
OUTPUT_KEYS = ("images", "gifs", "videos", "audio", "files")
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


# --- manifest -----------------------------------------------------------------------------------------------------

class Manifest:
    """Append-only JSONL; the last record of a key wins."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, MANIFEST)

    def load(self):
        records = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash mid-write
                    records[rec.get("key")] = rec
        return records

    def append(self, record):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def finished_ok(record, out_dir):
    return bool(record) and record.get("status") == "success" and all(
        os.path.exists(os.path.join(out_dir, o["path"])) for o in record.get("outputs", []))


# --- progress -----------------------------------------------------------------------------------------------------

class Progress:
    """One terminal line: runs done / total, failures and the node progress of the latest running prompt."""

    def __init__(self, total, stream=None, enabled=None):
        self.total, self.done, self.failed, self.skipped = total, 0, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.detail = ""

    def step(self, value, maximum, node):
        self.detail = f"node {node} {value}/{maximum}"
        self.draw()

    def finish_run(self, ok):
        self.done += 1
        self.failed += 0 if ok else 1
        self.detail = ""
        self.draw()

    def draw(self):
        if not self.enabled:
            return
        width = 24
        frac = (self.done + self.skipped) / max(self.total, 1)
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        fail = f", {self.failed} failed" if self.failed else ""
        self.stream.write(f"\r[{bar}] {self.done + self.skipped}/{self.total} runs{fail} {self.detail:<24}")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# --- runner -------------------------------------------------------------------------------------------------------

class BatchRunner:
    def __init__(self, server, out_dir, concurrency=2, retry=None, poll_interval=2.0, run_timeout=None,
                 resubmits=3, progress=None, log=None, extra_data=None):
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.server = server
        self.out_dir = os.path.abspath(out_dir)
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.poll_interval = poll_interval
        self.run_timeout = run_timeout
        self.resubmits = resubmits
        self.progress_enabled = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.extra_data = extra_data
        self.manifest = Manifest(self.out_dir)
        self.client_id = uuid.uuid4().hex
        self._signals = {}      # prompt id -> asyncio.Event set on a terminal websocket message
        self._events = {}       # prompt id -> {"started": t, "error": data}
        self._queued = set()    # prompt ids submitted and not yet seen finished (kept on cancel, for _unqueue)
        self.progress = None

    # websocket callbacks ------------------------------------------------------------------------------------------
    def _on_message(self, msg):
        kind, data = msg.get("type"), msg.get("data") or {}
        pid = data.get("prompt_id")
        if pid not in self._signals:
            return
        info = self._events.setdefault(pid, {})
        if kind == "execution_start":
            info["started"] = time.time()
        elif kind == "progress" and self.progress:
            self.progress.step(data.get("value"), data.get("max"), data.get("node"))
        elif kind == "execution_error":
            info["error"] = data
        if kind in TERMINAL_EVENTS or (kind == "executing" and data.get("node") is None):
            self._signals[pid].set()

    def _on_state(self, connected):
        (self._ws_up.set if connected else self._ws_up.clear)()
        for signal in self._signals.values():  # messages may have been missed: make every waiter re-check
            signal.set()

    # main entry -----------------------------------------------------------------------------------------------------
    async def run(self, runs):
        """Run all ``runs`` (sweep.Run); returns one manifest record per run, in order (finished ones from an
        earlier invocation included as they were)."""
        os.makedirs(self.out_dir, exist_ok=True)
        previous = self.manifest.load()
        done = {r.key: previous[r.key] for r in runs if finished_ok(previous.get(r.key), self.out_dir)}
        todo = [r for r in runs if r.key not in done]
        self.progress = Progress(len(runs), enabled=self.progress_enabled)
        self.progress.skipped = len(done)
        if done:
            self.log(f"resume: {len(done)} of {len(runs)} runs already finished in {self.manifest.path}")
        self._ws_up, stop = asyncio.Event(), asyncio.Event()
        sem = asyncio.Semaphore(self.concurrency)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            self.client = ComfyClient(self.server, session, self.client_id, self.retry)
            listener = asyncio.create_task(self.client.listen(self._on_message, self._on_state, stop))
            try:
                try:  # connect the websocket before the first POST so no message is missed
                    await asyncio.wait_for(self._ws_up.wait(), timeout=5)
                except asyncio.TimeoutError:
                    self.log("websocket not connected yet; following runs through /history only")
                results = await asyncio.gather(*(self._run_one(run, sem) for run in todo))
            except asyncio.CancelledError:
                await self._unqueue(sorted(self._queued))
                raise
            finally:
                stop.set()
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
                self.progress.close()
        done.update((rec["key"], rec) for rec in results)
        return [done[r.key] for r in runs]

    async def _unqueue(self, prompt_ids):
        """On interrupt, take our prompts that have not started off the server's queue (best effort: the one
        running finishes; a rerun submits the unfinished runs again)."""
        if prompt_ids:
            try:
                await asyncio.wait_for(self.client.delete_queued(prompt_ids), timeout=3)
            except (ServerUnavailable, asyncio.TimeoutError, aiohttp.ClientError):
                pass

    async def _run_one(self, run, sem):
        async with sem:
            record = {"key": run.key, "params": run.params, "status": None, "prompt_id": None, "attempts": 0,
                      "outputs": [], "error": None, "node_errors": {}, "server": self.server,
                      "timings": {"submitted": None, "started": None, "finished": None, "seconds": None},
                      "prompt": run.prompt}
            try:
                await self._execute(run, record)
            except PromptRejected as e:
                record.update(status="invalid", error=e.error, node_errors=e.node_errors)
                self.log(f"run {run.key} {run.params}: prompt rejected by the server:\n"
                         + format_rejection(e.error, e.node_errors, run.prompt))
            except ServerUnavailable as e:
                record.update(status="unreachable", error={"message": str(e)})
                self.log(f"run {run.key}: {e}")
            except asyncio.TimeoutError:
                record.update(status="timeout", error={"message": f"no result within {self.run_timeout}s"})
            record["timings"]["finished"] = time.time()
            if record["timings"]["submitted"]:
                record["timings"]["seconds"] = round(record["timings"]["finished"] - record["timings"]["submitted"], 3)
            self.manifest.append(record)
            self.progress.finish_run(record["status"] == "success")
            return record

    async def _execute(self, run, record):
        for attempt in range(1, self.resubmits + 2):
            pid = uuid.uuid4().hex
            record.update(prompt_id=pid, attempts=attempt)
            self._signals[pid] = asyncio.Event()
            self._queued.add(pid)
            try:
                response = await self._submit(run.prompt, pid)
                record["timings"]["submitted"] = time.time()
                if response.get("node_errors"):  # some outputs invalid: the rest still runs
                    record["node_errors"] = response["node_errors"]
                    self.log(f"run {run.key}: some outputs were dropped by validation:\n"
                             + format_rejection(None, response["node_errors"], run.prompt))
                entry = await asyncio.wait_for(self._wait(pid), timeout=self.run_timeout)
            except asyncio.CancelledError:
                raise  # the id stays in _queued: run() takes it off the server's queue
            except BaseException:
                self._queued.discard(pid)
                raise
            else:
                self._queued.discard(pid)
            finally:
                self._signals.pop(pid, None)
            events = self._events.pop(pid, {})
            if entry is None:
                self.log(f"run {run.key}: the server lost prompt {pid} (restart?); resubmitting")
                continue
            record["timings"]["started"] = events.get("started")
            status = (entry.get("status") or {}).get("status_str", "success")
            if status != "success":
                record.update(status="error", error=_execution_error(entry, events))
                err = record["error"]
                self.log(f"run {run.key}: execution error in node {err.get('node_id')} ({err.get('node_type')}): "
                         f"{err.get('exception_message', '').strip()}")
                return
            record["outputs"] = await self._download(run.key, entry.get("outputs") or {})
            record["status"] = "success"
            return
        record.update(status="lost", error={"message": f"prompt lost {self.resubmits + 1} times; server unstable?"})

    async def _submit(self, prompt, pid):
        """POST once per try: if the connection breaks, the server may still have queued it, so look the id up
        before posting again (a blind retry could queue the prompt twice)."""
        delays = self.retry.delays()
        while True:
            try:
                return await self.client.submit(prompt, pid, self.extra_data, retry=False)
            except ServerUnavailable:
                delay = next(delays, None)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                if await self.client.history(pid) is not None or pid in await self.client.queued_ids():
                    return {}

    async def _wait(self, pid):
        """History entry of ``pid`` once finished; None if the server forgot it (restart)."""
        signal = self._signals[pid]
        while True:
            try:
                await asyncio.wait_for(signal.wait(), timeout=self.poll_interval)
                woke = True
            except asyncio.TimeoutError:
                woke = False
            signal.clear()
            state, entry = await self._state(pid)
            if state == "done":
                return entry
            if state == "lost":
                return None
            if woke:  # history is written just after the last message: look again shortly
                await asyncio.sleep(0.05)
                signal.set()

    async def _state(self, pid):
        entry = await self.client.history(pid)
        if entry is not None:
            return "done", entry
        if pid in await self.client.queued_ids():
            return "pending", None
        entry = await self.client.history(pid)  # it may have finished between the two requests
        return ("done", entry) if entry is not None else ("lost", None)

    async def _download(self, key, outputs):
        saved = []
        folder = os.path.join(self.out_dir, key)
        for node_id, ui in sorted(outputs.items(), key=lambda kv: str(kv[0])):
            for kind in OUTPUT_KEYS:
                for i, item in enumerate(ui.get(kind) or []):
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    data = await self.client.view(item)
                    name = f"{_safe(node_id)}_{i}_{_safe(os.path.basename(item['filename']))}"
                    path = os.path.join(folder, name)
                    os.makedirs(folder, exist_ok=True)
                    with open(path + ".part", "wb") as f:
                        f.write(data)
                    os.replace(path + ".part", path)
                    saved.append({"node": str(node_id), "kind": kind, "filename": item["filename"],
                                  "subfolder": item.get("subfolder", ""), "type": item.get("type", "output"),
                                  "path": os.path.relpath(path, self.out_dir)})
        return saved


def _execution_error(entry, events):
    if events.get("error"):
        return events["error"]
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return data
    return {"message": "execution failed", "status": entry.get("status")}


def _safe(name):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip(".") or "out"


def run_batch(server, runs, out_dir, **kw):
    """Synchronous wrapper: ``asyncio.run(BatchRunner(...).run(runs))``."""
    return asyncio.run(BatchRunner(server, out_dir, **kw).run(runs))
