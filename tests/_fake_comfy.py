"""A fake ComfyUI server (aiohttp, loopback only) for the batch runner tests.

It follows ComfyUI's documented HTTP/websocket behaviour (``server.py``, ``execution.py`` at v0.3.64):
``POST /prompt`` validates (unknown class, missing required input, bad link, min/max, combo) and answers 400 with
``node_errors`` when nothing can run; prompts run one at a time; the submitting client gets ``status``,
``execution_start``, ``executing``, ``progress``, ``executed``, ``execution_success`` / ``execution_error`` and
``executing {node: null}``; ``/history/{id}`` is written just after the last message; ``/queue``, ``/view`` and
``/object_info`` work. Failures can be injected: an execution error chosen per prompt, websocket drops, a
simulated restart (the listening socket goes away, queue and history are forgotten) and a kill (the socket goes
away for good while a prompt runs).
"""
import asyncio
import io
import time

from aiohttp import web
from PIL import Image

HOST = "127.0.0.1"


class FakeComfy:
    def __init__(self, object_info, step_delay=0.002, fail=None, drop_ws_every=None, restart_after=None,
                 restart_down_for=0.3, die_after=None):
        self.object_info = object_info
        self.step_delay = step_delay
        self.fail = fail                      # fail(prompt) -> (node_id, message) | None
        self.drop_ws_every = drop_ws_every    # close every websocket after this many messages
        self.restart_after = restart_after    # restart once, right after this many accepted prompts
        self.restart_down_for = restart_down_for
        self.die_after = die_after            # stop for good (a killed server) once this many prompts started
        self.dead = False
        self.started = 0                      # prompts taken off the queue, all lifetimes
        self.port = None
        self.posts = 0                        # POST /prompt calls
        self.accepted = 0
        self.executed = []                    # prompt ids run to the end (success or error), all lifetimes
        self.max_in_flight = 0
        self.restarts = 0
        self.ws_drops = 0
        self.files = {}                       # (type, subfolder, filename) -> bytes (survive restarts, like a disk)
        self._runner = None
        self._fresh_state()

    def _fresh_state(self):
        self.queue = []                       # [(number, pid, prompt, extra_data, outputs)]
        self.running = None
        self.history = {}
        self.sockets = {}                     # client id -> WebSocketResponse
        self._sent = 0
        self._wake = asyncio.Event()

    @property
    def url(self):
        return f"http://{HOST}:{self.port}"

    # --- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self):
        app = web.Application()
        app.router.add_get("/object_info", self.get_object_info)
        app.router.add_post("/prompt", self.post_prompt)
        app.router.add_get("/history/{pid}", self.get_history)
        app.router.add_get("/queue", self.get_queue)
        app.router.add_post("/queue", self.post_queue)
        app.router.add_get("/view", self.get_view)
        app.router.add_get("/ws", self.get_ws)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port or 0, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._worker = asyncio.create_task(self._work())
        return self

    async def stop(self):
        if self.dead:
            return
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        for ws in list(self.sockets.values()):
            await ws.close()
        await self._runner.cleanup()

    async def _restart_soon(self):
        await asyncio.sleep(0.05)  # after this response has gone out, like a crash a moment later
        await self.restart()

    async def kill(self):
        """Like a killed ComfyUI: connections drop and the port stays closed."""
        self.dead = True
        self._worker.cancel()
        for ws in list(self.sockets.values()):
            await ws.close()
        await self._runner.cleanup()

    async def restart(self):
        """Like a crashed and restarted ComfyUI: connections drop, the port is closed for a while, and the new
        process has an empty queue and history (output files stay on disk)."""
        self.restarts += 1
        await self.stop()
        await asyncio.sleep(self.restart_down_for)
        self._fresh_state()
        await self.start()

    # --- routes -------------------------------------------------------------------------------------------------
    async def get_object_info(self, request):
        return web.json_response(self.object_info)

    async def post_prompt(self, request):
        self.posts += 1
        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return _error(400, "no_prompt", "No prompt provided", {})
        error, node_errors, outputs = self.validate(prompt)
        if error:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        pid = str(body.get("prompt_id") or f"p{self.posts}")
        extra = dict(body.get("extra_data") or {}, client_id=body.get("client_id"))
        self.queue.append((self.accepted, pid, prompt, extra, outputs))
        self.accepted += 1
        self.max_in_flight = max(self.max_in_flight, len(self.queue) + (self.running is not None))
        self._wake.set()
        if self.restart_after is not None and self.accepted == self.restart_after:
            self.restart_after = None
            self._restart_task = asyncio.create_task(self._restart_soon())
        return web.json_response({"prompt_id": pid, "number": self.accepted - 1, "node_errors": node_errors})

    async def get_history(self, request):
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def get_queue(self, request):
        running = [list(self.running[:4])] if self.running else []
        return web.json_response({"queue_running": running, "queue_pending": [list(q[:4]) for q in self.queue]})

    async def post_queue(self, request):
        body = await request.json()
        if body.get("clear"):
            self.queue.clear()
        doomed = set(body.get("delete") or [])
        self.queue = [q for q in self.queue if q[1] not in doomed]
        return web.Response(status=200)

    async def get_view(self, request):
        q = request.query
        key = (q.get("type", "output"), q.get("subfolder", ""), q.get("filename", ""))
        if key not in self.files:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[key], content_type="image/png")

    async def get_ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        cid = request.query.get("clientId") or "anon"
        self.sockets[cid] = ws
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": len(self.queue)}},
                                                       "sid": cid}})
        async for _ in ws:
            pass
        if self.sockets.get(cid) is ws:
            del self.sockets[cid]
        return ws

    # --- validation (execution.validate_prompt / validate_inputs, simplified) ----------------------------------------
    def validate(self, prompt):
        for nid, node in prompt.items():
            if node.get("class_type") not in self.object_info:
                return ({"type": "invalid_prompt", "message": f"Cannot execute because node "
                         f"{node.get('class_type')} does not exist.", "details": f"Node ID '#{nid}'",
                         "extra_info": {}}, {}, [])
        outputs = [nid for nid, n in prompt.items() if self.object_info[n["class_type"]].get("output_node")]
        if not outputs:
            return {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                    "extra_info": {}}, {}, []
        node_errors = {}
        for nid, node in prompt.items():
            errors = self._node_errors(prompt, node)
            if errors:
                node_errors[nid] = {"errors": errors, "dependent_outputs": [], "class_type": node["class_type"]}
        good = []
        for out in outputs:
            bad = [nid for nid in _ancestors(prompt, out) if nid in node_errors]
            for nid in bad:
                node_errors[nid]["dependent_outputs"].append(out)
            if not bad:
                good.append(out)
        if not good:
            return ({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                     "details": "", "extra_info": {}}, node_errors, [])
        return None, node_errors, good

    def _node_errors(self, prompt, node):
        info = self.object_info[node["class_type"]]
        errors = []
        inputs = node.get("inputs", {})
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                if name not in inputs:
                    if section == "required":
                        errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                       "details": name, "extra_info": {"input_name": name}})
                    continue
                val = inputs[name]
                if isinstance(val, list):
                    src = prompt.get(str(val[0]))
                    if len(val) != 2 or src is None:
                        errors.append({"type": "bad_linked_input", "message": "Bad linked input",
                                       "details": name, "extra_info": {"input_name": name}})
                        continue
                    src_out = self.object_info[src["class_type"]]["output"]
                    got = src_out[val[1]] if val[1] < len(src_out) else None
                    want = "COMBO" if isinstance(typ, list) else typ
                    if got != want and "*" not in (got, want):
                        errors.append({"type": "return_type_mismatch",
                                       "message": "Return type mismatch between linked nodes",
                                       "details": f"{name}, received_type({got}) mismatch input_type({want})",
                                       "extra_info": {"input_name": name}})
                    continue
                if "min" in opts and isinstance(val, (int, float)) and val < opts["min"]:
                    errors.append({"type": "value_smaller_than_min",
                                   "message": f"Value {val} smaller than min of {opts['min']}", "details": name,
                                   "extra_info": {"input_name": name, "received_value": val}})
                elif "max" in opts and isinstance(val, (int, float)) and val > opts["max"]:
                    errors.append({"type": "value_bigger_than_max",
                                   "message": f"Value {val} bigger than max of {opts['max']}", "details": name,
                                   "extra_info": {"input_name": name, "received_value": val}})
                elif isinstance(typ, list) and val not in typ:
                    errors.append({"type": "value_not_in_list", "message": "Value not in list",
                                   "details": f"{name}: '{val}' not in {typ}",
                                   "extra_info": {"input_name": name, "received_value": val}})
        return errors

    # --- execution --------------------------------------------------------------------------------------------------
    async def _send(self, cid, kind, data):
        ws = self.sockets.get(cid)
        if ws is None or ws.closed:
            return  # ComfyUI drops messages for clients that are not connected
        try:
            await ws.send_json({"type": kind, "data": data})
        except (ConnectionError, RuntimeError):
            return
        self._sent += 1
        if self.drop_ws_every and self._sent % self.drop_ws_every == 0:
            self.ws_drops += 1
            await ws.close()

    async def _work(self):
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            self.running = self.queue.pop(0)
            self.started += 1
            if self.die_after is not None and self.started > self.die_after:
                self.dead = True   # killed while this prompt runs: it never finishes
                asyncio.get_running_loop().create_task(self.kill())
                return
            try:
                await self._execute(*self.running)
            finally:
                self.running = None

    async def _execute(self, number, pid, prompt, extra, outputs):
        cid = extra.get("client_id")
        started = time.time()
        messages = [["execution_start", {"prompt_id": pid, "timestamp": started}]]
        await self._send(cid, "execution_start", {"prompt_id": pid, "timestamp": started})
        failure = self.fail(prompt) if self.fail else None
        ui_outputs = {}
        for nid in _execution_order(prompt, outputs):
            node = prompt[nid]
            await self._send(cid, "executing", {"node": nid, "display_node": nid, "prompt_id": pid})
            steps = node["inputs"].get("steps")
            if isinstance(steps, int):
                for i in range(1, min(steps, 5) + 1):
                    await asyncio.sleep(self.step_delay)
                    await self._send(cid, "progress", {"value": i, "max": steps, "prompt_id": pid, "node": nid})
            await asyncio.sleep(self.step_delay)
            if failure and failure[0] == nid:
                error = {"prompt_id": pid, "node_id": nid, "node_type": node["class_type"],
                         "executed": [], "exception_message": failure[1], "exception_type": "RuntimeError",
                         "traceback": ["fake traceback"], "current_inputs": {}, "current_outputs": {}}
                await self._send(cid, "execution_error", error)
                messages.append(["execution_error", error])
                await self._finish(pid, prompt, extra, outputs, ui_outputs, messages, "error")
                return
            if nid in outputs:
                ui_outputs[nid] = {"images": [self._save_image(pid, nid, prompt)]}
                await self._send(cid, "executed", {"node": nid, "display_node": nid, "output": ui_outputs[nid],
                                                   "prompt_id": pid})
        await self._send(cid, "execution_success", {"prompt_id": pid, "timestamp": time.time()})
        messages.append(["execution_success", {"prompt_id": pid}])
        await self._send(cid, "executing", {"node": None, "prompt_id": pid})
        await self._finish(pid, prompt, extra, outputs, ui_outputs, messages, "success")

    async def _finish(self, pid, prompt, extra, outputs, ui_outputs, messages, status):
        await asyncio.sleep(0.01)  # ComfyUI writes history just after the last websocket message
        self.history[pid] = {"prompt": [0, pid, prompt, extra, outputs], "outputs": ui_outputs,
                             "status": {"status_str": status, "completed": status == "success",
                                        "messages": messages}, "meta": {}}
        self.executed.append(pid)

    def _save_image(self, pid, nid, prompt):
        """An 8x8 PNG whose brightness depends on the prompt's seed, so rewards can rank the runs."""
        seed = next((n["inputs"][k] for n in prompt.values() for k in ("seed", "noise_seed")
                     if isinstance(n.get("inputs", {}).get(k), int)), 0)
        level = int(255 * ((seed % 10) / 9))
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (level, level, level)).save(buf, format="PNG")
        name = f"ComfyUI_{pid}_{nid}.png"
        kind = "temp" if prompt[nid]["class_type"] == "PreviewImage" else "output"
        self.files[(kind, "", name)] = buf.getvalue()
        return {"filename": name, "subfolder": "", "type": kind}


def _links(node):
    return [str(v[0]) for v in node.get("inputs", {}).values() if isinstance(v, list) and len(v) == 2]


def _ancestors(prompt, nid, seen=None):
    seen = set() if seen is None else seen
    if nid in seen or nid not in prompt:
        return seen
    seen.add(nid)
    for src in _links(prompt[nid]):
        _ancestors(prompt, src, seen)
    return seen


def _execution_order(prompt, outputs):
    order, done = [], set()

    def visit(nid):
        if nid in done:
            return
        done.add(nid)
        for src in _links(prompt[nid]):
            visit(src)
        order.append(nid)

    for out in outputs:
        visit(out)
    return order


def _error(status, kind, message, node_errors):
    return web.json_response({"error": {"type": kind, "message": message, "details": message, "extra_info": {}},
                              "node_errors": node_errors}, status=status)
