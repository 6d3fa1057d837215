"""Run a list of prompts on one or more ComfyUI servers: runs go where there is room, a server that dies hands
its runs to the others, one manifest, per-server progress, resume.

Each server takes up to its own concurrency of runs at once; every run is submitted to ``POST /prompt`` under a
prompt id we choose, followed over that server's websocket, and confirmed through ``/history`` (the websocket may
drop messages, so ``/history`` + ``/queue`` are polled as a safety net). When a server stops answering, it is
marked down at once: its unfinished runs go back to the front of the shared queue for any server, and it is
probed until it answers again (then the prompts it still holds for us are taken off its queue, so no run executes
twice). A prompt that a server no longer knows (a restart that forgot its queue) is submitted again.

There is one give-up deadline for the whole batch: when no server has answered for ``give_up`` seconds, the runs
left are recorded as unreachable and the batch ends. Every finished run is appended to ``manifest.jsonl`` (with
the server that ran it) and flushed to disk at once, so an interrupt (Ctrl-C) loses nothing finished, and a rerun
skips runs whose key already succeeded.
"""
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass

import aiohttp

from .client import ComfyClient, PromptRejected, RetryPolicy, ServerUnavailable, check_server_url, format_rejection

MANIFEST = "manifest.jsonl"
OUTPUT_KEYS = ("images", "gifs", "videos", "audio", "files")
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
# Tries per request before a server counts as down (short: the batch-wide give-up deadline does the waiting).
SERVER_RETRY = RetryPolicy(attempts=3, base_delay=0.25, max_delay=1.0)


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


# --- servers --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSpec:
    url: str
    concurrency: int = 2


def parse_servers(values, default_concurrency=2):
    """ServerSpecs from ``--server`` values: a URL, or a file with one ``URL [CONCURRENCY]`` per line ('#'
    comments). Raises ValueError naming the bad entry."""
    specs = []
    for value in values:
        if not str(value).startswith(("http://", "https://")) and os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    parts = line.split("#", 1)[0].split()
                    if not parts:
                        continue
                    if len(parts) > 2:
                        raise ValueError(f"{value}:{n}: expected 'URL [CONCURRENCY]', got {line.strip()!r}")
                    try:
                        concurrency = int(parts[1]) if len(parts) == 2 else default_concurrency
                    except ValueError:
                        raise ValueError(f"{value}:{n}: concurrency must be a whole number, got {parts[1]!r}") from None
                    specs.append(_spec(parts[0], concurrency, f"{value}:{n}: "))
            continue
        specs.append(_spec(value, default_concurrency, ""))
    urls = [s.url for s in specs]
    dupes = sorted({u for u in urls if urls.count(u) > 1})
    if dupes:
        raise ValueError(f"server listed twice: {', '.join(dupes)} (give it a higher concurrency instead)")
    if not specs:
        raise ValueError("no server given: --server URL (repeatable) or --server FILE with one URL per line")
    return specs


def _spec(url, concurrency, where):
    if concurrency < 1:
        raise ValueError(f"{where}concurrency must be at least 1, got {concurrency}")
    try:
        return ServerSpec(check_server_url(url), concurrency)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


class ServerDown(RuntimeError):
    """The server stopped answering while it had a run; the run goes back to the queue."""


class _Server:
    """One server's connection and bookkeeping."""

    def __init__(self, spec, session, request_retry):
        self.url, self.concurrency = spec.url, spec.concurrency
        self.client_id = uuid.uuid4().hex
        self.client = ComfyClient(spec.url, session, self.client_id, request_retry)
        self.up = asyncio.Event()
        self.ws_up = asyncio.Event()
        self.down_since = None
        self.last_error = None
        self.excluded = None        # why this server cannot run the batch (missing nodes)
        self.checked = False
        self.signals = {}           # prompt id -> asyncio.Event set on a terminal websocket message
        self.events = {}            # prompt id -> {"started": t, "error": data}
        self.queued = set()         # our prompt ids submitted here and not yet seen finished
        self.orphans = set()        # prompt ids left here when it went down: taken off its queue when it is back
        self.running = 0
        self.done = 0
        self.failed = 0
        self.detail = ""

    @property
    def name(self):
        return self.url.split("://", 1)[-1]


# --- progress -----------------------------------------------------------------------------------------------------

class Progress:
    """One terminal line: runs done / total, failures, and per server its state, runs in flight, finished runs and
    the node progress of its latest running prompt."""

    def __init__(self, total, servers=(), stream=None, enabled=None):
        self.total, self.done, self.failed, self.skipped = total, 0, 0, 0
        self.servers = list(servers)
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def step(self, server, value, maximum, node):
        server.detail = f"node {node} {value}/{maximum}"
        self.draw()

    def finish_run(self, server, ok):
        self.done += 1
        self.failed += 0 if ok else 1
        if server is not None:
            server.done += 1
            server.failed += 0 if ok else 1
            server.detail = ""
        self.draw()

    def line(self):
        width = 24
        frac = (self.done + self.skipped) / max(self.total, 1)
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        fail = f", {self.failed} failed" if self.failed else ""
        parts = [f"[{bar}] {self.done + self.skipped}/{self.total} runs{fail}"]
        for s in self.servers:
            if s.excluded:
                state = "excluded"
            elif not s.up.is_set():
                state = f"down {time.monotonic() - s.down_since:.0f}s" if s.down_since else "connecting"
            else:
                state = f"{s.running} running, {s.done} done" + (f" {s.detail}" if s.detail else "")
            parts.append(f"{s.name}: {state}")
        return " | ".join(parts)

    def draw(self):
        if self.enabled:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# --- runner -------------------------------------------------------------------------------------------------------

class BatchRunner:
    """``servers``: a URL, a list of URLs or ServerSpecs. ``concurrency`` applies to servers given as plain URLs.
    ``give_up``: seconds without any reachable server before the runs left are given up. ``finalize(prompt)``
    returns the prompt to submit (text replacements done at submission time)."""

    def __init__(self, servers, out_dir, concurrency=2, give_up=120.0, poll_interval=2.0, run_timeout=None,
                 resubmits=3, progress=None, log=None, extra_data=None, finalize=None, probe_interval=1.0,
                 request_retry=None, required_nodes=()):
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if isinstance(servers, (str, ServerSpec)):
            servers = [servers]
        self.specs = [s if isinstance(s, ServerSpec) else ServerSpec(check_server_url(s), concurrency)
                      for s in servers]
        self.out_dir = os.path.abspath(out_dir)
        self.give_up = give_up
        self.poll_interval = poll_interval
        self.run_timeout = run_timeout
        self.resubmits = resubmits
        self.progress_enabled = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.extra_data = extra_data
        self.finalize = finalize or (lambda prompt: prompt)
        self.probe_interval = probe_interval
        self.request_retry = request_retry or SERVER_RETRY
        self.required_nodes = set(required_nodes)
        self.manifest = Manifest(self.out_dir)
        self.servers = []
        self.progress = None
        self.gave_up = None          # the message, when the deadline passed

    @property
    def server(self):
        return self.specs[0].url

    # main entry -----------------------------------------------------------------------------------------------------
    async def run(self, runs):
        """Run all ``runs`` (sweep.Run); returns one manifest record per run, in order (finished ones from an
        earlier invocation included as they were)."""
        os.makedirs(self.out_dir, exist_ok=True)
        previous = self.manifest.load()
        done = {r.key: previous[r.key] for r in runs if finished_ok(previous.get(r.key), self.out_dir)}
        todo = [r for r in runs if r.key not in done]
        if done:
            self.log(f"resume: {len(done)} of {len(runs)} runs already finished in {self.manifest.path}")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.servers = [_Server(spec, session, self.request_retry) for spec in self.specs]
            self.progress = Progress(len(runs), self.servers, enabled=self.progress_enabled)
            self.progress.skipped = len(done)
            results = await self._run_all(todo)
        done.update(results)
        return [done[r.key] for r in runs]

    async def _run_all(self, todo):
        self._pending = asyncio.PriorityQueue()
        for index, run in enumerate(todo):
            self._pending.put_nowait((index, run))
        self._index = {run.key: index for index, run in enumerate(todo)}
        self._results = {}
        self._left = len(todo)
        self._all_done = asyncio.Event()
        if not todo:
            self._all_done.set()
        self._cluster_down_since = time.monotonic()
        self._in_flight, self._tries = {}, {}
        stop = asyncio.Event()
        tasks = []
        for server in self.servers:
            tasks.append(asyncio.create_task(server.client.listen(
                lambda msg, s=server: self._on_message(s, msg), lambda up, s=server: self._on_state(s, up), stop)))
            tasks.append(asyncio.create_task(self._watch(server)))
            tasks += [asyncio.create_task(self._worker(server)) for _ in range(server.concurrency)]
        deadline = asyncio.create_task(self._deadline())
        try:
            await asyncio.wait([asyncio.create_task(self._all_done.wait()), deadline],
                               return_when=asyncio.FIRST_COMPLETED)
            if self.gave_up:
                self._give_up_remaining()
        except asyncio.CancelledError:
            await self._unqueue_all()
            raise
        finally:
            stop.set()
            for task in tasks + [deadline]:
                task.cancel()
            await asyncio.gather(*tasks, deadline, return_exceptions=True)
            self.progress.close()
        return self._results

    def _record_result(self, record, server):
        if record["key"] in self._results:
            return   # already recorded (a run given up while its server came back)
        self._results[record["key"]] = record
        self.manifest.append(record)
        self.progress.finish_run(server, record["status"] == "success")
        self._left -= 1
        if self._left <= 0:
            self._all_done.set()

    # servers: availability ------------------------------------------------------------------------------------------
    async def _watch(self, server):
        """Probe a server until it answers, then keep it marked up until a request fails (_mark_down)."""
        while True:
            if server.up.is_set() or server.excluded:
                await asyncio.sleep(self.probe_interval)
                continue
            try:
                await server.client.queued_ids(retry=False)
            except (ServerUnavailable, aiohttp.ClientError, asyncio.TimeoutError) as e:
                server.last_error = str(e)
                server.down_since = server.down_since or time.monotonic()
                self.progress.draw()
                await asyncio.sleep(self.probe_interval)
                continue
            if not await self._usable(server):
                continue
            await self._take_back_orphans(server)
            try:   # follow the websocket from the first prompt on (history polling covers any gap)
                await asyncio.wait_for(server.ws_up.wait(), timeout=2)
            except asyncio.TimeoutError:
                pass
            if server.down_since is not None and server.checked:
                self.log(f"{server.name}: back after {time.monotonic() - server.down_since:.0f}s")
            server.down_since = None
            server.up.set()
            self._cluster_down_since = None
            self.progress.draw()

    async def _usable(self, server):
        """Check once that the server has every node the batch needs (else it sits the batch out)."""
        if server.checked:
            return True
        try:
            info = await server.client.object_info()
        except (ServerUnavailable, aiohttp.ClientError, asyncio.TimeoutError) as e:
            server.last_error = str(e)
            return False
        server.checked = True
        missing = sorted(self.required_nodes - set(info))
        if missing:
            server.excluded = f"lacks the nodes {missing}"
            self.log(f"{server.name}: not used, it {server.excluded} (install the same custom nodes on every server)")
            self._check_cluster()
            return False
        return True

    def _mark_down(self, server, error):
        if server.up.is_set():
            self.log(f"{server.name}: not answering ({error}); its runs go to the other servers")
        server.up.clear()
        server.last_error = str(error)
        server.down_since = server.down_since or time.monotonic()
        server.orphans |= server.queued
        self._check_cluster()
        self.progress.draw()

    def _check_cluster(self):
        if not any(s.up.is_set() for s in self.servers) and self._cluster_down_since is None:
            self._cluster_down_since = time.monotonic()

    async def _take_back_orphans(self, server):
        """Prompts a server still holds from before it went down: take them off its queue (they ran elsewhere)."""
        if not server.orphans:
            return
        try:
            await server.client.delete_queued(sorted(server.orphans))
        except (ServerUnavailable, aiohttp.ClientError, asyncio.TimeoutError):
            return
        server.orphans.clear()

    async def _deadline(self):
        while True:
            await asyncio.sleep(min(0.2, self.give_up / 4 if self.give_up else 0.2))
            usable = [s for s in self.servers if not s.excluded]
            if not usable:
                self.gave_up = "no server can run this batch: " + "; ".join(
                    f"{s.name} {s.excluded}" for s in self.servers)
                return
            since = self._cluster_down_since
            if since is not None and not any(s.up.is_set() for s in usable) \
                    and time.monotonic() - since >= self.give_up:
                self.gave_up = (f"no server answered for {self.give_up:g}s: " + "; ".join(
                    f"{s.name}: {s.last_error or 'no answer'}" for s in usable))
                return

    def _give_up_remaining(self):
        self.log(f"giving up: {self.gave_up}")
        pending = []
        while not self._pending.empty():
            pending.append(self._pending.get_nowait()[1])
        for run in pending + list(self._in_flight.values()):
            if run.key not in self._results:
                record = self._new_record(run, None)
                record.update(status="unreachable", error={"message": self.gave_up})
                self._record_result(record, None)

    async def _unqueue_all(self):
        """On interrupt, take our prompts that have not started off every server's queue (best effort: running
        ones finish; a rerun submits the unfinished runs again)."""
        for server in self.servers:
            if server.queued:
                try:
                    await asyncio.wait_for(server.client.delete_queued(sorted(server.queued)), timeout=3)
                except (ServerUnavailable, asyncio.TimeoutError, aiohttp.ClientError):
                    pass

    # websocket callbacks ------------------------------------------------------------------------------------------
    def _on_message(self, server, msg):
        kind, data = msg.get("type"), msg.get("data") or {}
        pid = data.get("prompt_id")
        if pid not in server.signals:
            return
        info = server.events.setdefault(pid, {})
        if kind == "execution_start":
            info["started"] = time.time()
        elif kind == "progress" and self.progress:
            self.progress.step(server, data.get("value"), data.get("max"), data.get("node"))
        elif kind == "execution_error":
            info["error"] = data
        if kind in TERMINAL_EVENTS or (kind == "executing" and data.get("node") is None):
            server.signals[pid].set()

    def _on_state(self, server, connected):
        (server.ws_up.set if connected else server.ws_up.clear)()
        for signal in server.signals.values():  # messages may have been missed: make every waiter re-check
            signal.set()

    # workers ----------------------------------------------------------------------------------------------------------
    async def _worker(self, server):
        while True:
            await server.up.wait()
            index, run = await self._pending.get()
            if not server.up.is_set():            # went down while we waited for a run
                self._pending.put_nowait((index, run))
                continue
            token = object()
            self._in_flight[token] = run
            server.running += 1
            self.progress.draw()
            try:
                record = await self._run_one(server, run)
            except ServerDown as e:
                self._mark_down(server, e)
                self._pending.put_nowait((index, run))   # back to the front of the queue, for any server
                continue
            finally:
                server.running -= 1
                self._in_flight.pop(token, None)
            self._record_result(record, server)

    def _new_record(self, run, server):
        return {"key": run.key, "params": run.params, "status": None, "prompt_id": None, "attempts": 0,
                "outputs": [], "error": None, "node_errors": {}, "server": server.url if server else None,
                "timings": {"submitted": None, "started": None, "finished": None, "seconds": None},
                "prompt": run.prompt}

    async def _run_one(self, server, run):
        record = self._new_record(run, server)
        record["attempts"] = self._attempts(run)
        try:
            await self._execute(server, run, record)
        except PromptRejected as e:
            record.update(status="invalid", error=e.error, node_errors=e.node_errors)
            self.log(f"run {run.key} {run.params}: prompt rejected by {server.name}:\n"
                     + format_rejection(e.error, e.node_errors, run.prompt))
        except asyncio.TimeoutError:
            record.update(status="timeout", error={"message": f"no result within {self.run_timeout}s"})
        record["timings"]["finished"] = time.time()
        if record["timings"]["submitted"]:
            record["timings"]["seconds"] = round(record["timings"]["finished"] - record["timings"]["submitted"], 3)
        return record

    def _attempts(self, run):
        self._tries[run.key] = self._tries.get(run.key, 0) + 1
        return self._tries[run.key]

    async def _execute(self, server, run, record):
        prompt = self.finalize(run.prompt)
        for lost in range(self.resubmits + 1):
            pid = uuid.uuid4().hex
            record["prompt_id"] = pid
            server.signals[pid] = asyncio.Event()
            server.queued.add(pid)
            try:
                response = await self._submit(server, prompt, pid)
                record["timings"]["submitted"] = time.time()
                if response.get("node_errors"):  # some outputs invalid: the rest still runs
                    record["node_errors"] = response["node_errors"]
                    self.log(f"run {run.key}: some outputs were dropped by validation:\n"
                             + format_rejection(None, response["node_errors"], run.prompt))
                entry = await asyncio.wait_for(self._wait(server, pid), timeout=self.run_timeout)
            except ServerUnavailable as e:
                raise ServerDown(str(e)) from None      # the prompt id stays in server.queued -> orphans
            except asyncio.CancelledError:
                raise  # the id stays in queued: run() takes it off the server's queue
            except BaseException:
                server.queued.discard(pid)
                raise
            else:
                server.queued.discard(pid)
            finally:
                server.signals.pop(pid, None)
            events = server.events.pop(pid, {})
            if entry is None:
                self.log(f"run {run.key}: {server.name} lost prompt {pid} (restart?); resubmitting")
                record["attempts"] = self._attempts(run)
                continue
            record["timings"]["started"] = events.get("started")
            status = (entry.get("status") or {}).get("status_str", "success")
            if status != "success":
                record.update(status="error", error=_execution_error(entry, events))
                err = record["error"]
                self.log(f"run {run.key}: execution error in node {err.get('node_id')} ({err.get('node_type')}) on "
                         f"{server.name}: {err.get('exception_message', '').strip()}")
                return
            try:
                record["outputs"] = await self._download(server, run.key, entry.get("outputs") or {})
            except ServerUnavailable as e:
                raise ServerDown(str(e)) from None
            record["status"] = "success"
            return
        record.update(status="lost", error={"message": f"prompt lost {self.resubmits + 1} times; server unstable?"})

    async def _submit(self, server, prompt, pid):
        """POST once: if the connection breaks, the server may still have queued it, so look the id up before
        giving the run back (a blind retry could queue the prompt twice)."""
        try:
            return await server.client.submit(prompt, pid, self.extra_data, retry=False)
        except ServerUnavailable:
            try:
                if await server.client.history(pid) is not None or pid in await server.client.queued_ids():
                    return {}
            except ServerUnavailable:
                pass
            raise

    async def _wait(self, server, pid):
        """History entry of ``pid`` once finished; None if the server forgot it (restart)."""
        signal = server.signals[pid]
        while True:
            try:
                await asyncio.wait_for(signal.wait(), timeout=self.poll_interval)
                woke = True
            except asyncio.TimeoutError:
                woke = False
            signal.clear()
            state, entry = await self._state(server, pid)
            if state == "done":
                return entry
            if state == "lost":
                return None
            if woke:  # history is written just after the last message: look again shortly
                await asyncio.sleep(0.05)
                signal.set()

    async def _state(self, server, pid):
        entry = await server.client.history(pid)
        if entry is not None:
            return "done", entry
        if pid in await server.client.queued_ids():
            return "pending", None
        entry = await server.client.history(pid)  # it may have finished between the two requests
        return ("done", entry) if entry is not None else ("lost", None)

    async def _download(self, server, key, outputs):
        saved = []
        folder = os.path.join(self.out_dir, key)
        for node_id, ui in sorted(outputs.items(), key=lambda kv: str(kv[0])):
            for kind in OUTPUT_KEYS:
                for i, item in enumerate(ui.get(kind) or []):
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    data = await server.client.view(item)
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


def run_batch(servers, runs, out_dir, **kw):
    """Synchronous wrapper: ``asyncio.run(BatchRunner(...).run(runs))``."""
    return asyncio.run(BatchRunner(servers, out_dir, **kw).run(runs))
