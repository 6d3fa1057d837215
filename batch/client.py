"""A small asyncio client for ComfyUI's HTTP + websocket API (``server.py``), with retries.

Every request is retried with exponential backoff while the server is unreachable or answers 5xx (a restart),
up to ``RetryPolicy.attempts`` (the batch runner keeps this short and waits for servers itself). The websocket
(``/ws?clientId=``) reconnects the same way; since messages sent
while it was down are lost, callers re-check ``/history`` and ``/queue`` after each reconnect.
"""
import asyncio
import json
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger("rewardlab.batch")

_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, ConnectionError)


class ServerUnavailable(RuntimeError):
    """The server stayed unreachable for the whole retry budget."""


class PromptRejected(RuntimeError):
    """``POST /prompt`` answered 400: the prompt failed validation (see ``node_errors``)."""

    def __init__(self, error, node_errors):
        self.error, self.node_errors = error or {}, node_errors or {}
        super().__init__(format_rejection(self.error, self.node_errors))


@dataclass
class RetryPolicy:
    attempts: int = 10          # tries per request (the first included)
    base_delay: float = 0.25    # seconds before the 2nd try; doubles each time
    max_delay: float = 8.0

    def delays(self):
        delay = self.base_delay
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_delay)


def format_rejection(error, node_errors, prompt=None):
    """node_errors as readable lines: ``node 3 (KSampler 'Sampler'): Value -1 smaller than min of 0 [seed]``."""
    lines = []
    if error:
        lines.append(f"{error.get('message', 'prompt rejected')}" + (
            f" ({error.get('type')})" if error.get("type") else ""))
    for nid, entry in sorted((node_errors or {}).items(), key=lambda kv: str(kv[0])):
        title = ((prompt or {}).get(nid, {}).get("_meta") or {}).get("title")
        who = f"node {nid} ({entry.get('class_type', '?')}{f' {title!r}' if title else ''})"
        for err in entry.get("errors", []):
            detail = f" [{err['details']}]" if err.get("details") else ""
            lines.append(f"  {who}: {err.get('message', err.get('type', 'error'))}{detail}")
    return "\n".join(lines) or "prompt rejected"


def check_server_url(url):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server must be an http(s) URL like http://127.0.0.1:8188, got {url!r}")
    return url.rstrip("/")


class ComfyClient:
    def __init__(self, server, session, client_id, retry=None):
        self.base = check_server_url(server)
        self.session = session
        self.client_id = client_id
        self.retry = retry or RetryPolicy()

    async def _request(self, method, path, *, expect_json=True, ok_statuses=(200,), retry=True, **kw):
        last = None
        delays = self.retry.delays() if retry else iter(())
        while True:
            try:
                async with self.session.request(method, self.base + path, **kw) as resp:
                    if resp.status >= 500:
                        raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                          message=await resp.text())
                    body = await resp.read()
                    if resp.status not in ok_statuses:
                        return resp.status, _json_or_text(body)
                    return resp.status, (json.loads(body) if expect_json else body)
            except aiohttp.ClientResponseError as e:
                if e.status < 500:
                    raise
                last = e
            except _RETRYABLE as e:
                last = e
            delay = next(delays, None)
            if delay is None:
                tries = self.retry.attempts if retry else 1
                raise ServerUnavailable(f"{method} {path}: server unreachable after {tries} tries "
                                        f"({type(last).__name__}: {last})")
            log.info("%s %s failed (%s); retrying in %.2fs", method, path, type(last).__name__, delay)
            await asyncio.sleep(delay)

    async def object_info(self):
        return (await self._request("GET", "/object_info"))[1]

    async def submit(self, prompt, prompt_id, extra_data=None, retry=True):
        """Queue a prompt under our own ``prompt_id``; 400 raises PromptRejected. Returns the response JSON
        (``node_errors`` there lists outputs that were dropped while the rest runs)."""
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, data = await self._request("POST", "/prompt", json=body, ok_statuses=(200, 400), retry=retry)
        if status == 400:
            data = data if isinstance(data, dict) else {"error": {"message": str(data)}}
            raise PromptRejected(data.get("error"), data.get("node_errors"))
        return data

    async def history(self, prompt_id):
        """The history entry of a prompt, or None while it is unknown or unfinished."""
        data = (await self._request("GET", f"/history/{prompt_id}"))[1]
        return (data or {}).get(prompt_id)

    async def queued_ids(self, retry=True):
        data = (await self._request("GET", "/queue", retry=retry))[1]
        return {item[1] for key in ("queue_running", "queue_pending") for item in data.get(key, [])}

    async def delete_queued(self, prompt_ids):
        """Remove pending prompts from the queue (``POST /queue {"delete": [...]}``); running ones are not touched."""
        await self._request("POST", "/queue", json={"delete": list(prompt_ids)}, expect_json=False, retry=False)

    async def view(self, item):
        params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                  "type": item.get("type", "output")}
        return (await self._request("GET", "/view", params=params, expect_json=False))[1]

    async def listen(self, on_message, on_state, stop):
        """Follow ``/ws`` until ``stop`` is set, reconnecting with backoff. ``on_message(dict)`` gets text frames
        (binary preview frames are skipped); ``on_state(connected: bool)`` is called on every (dis)connect."""
        url = self.base.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        delay = self.retry.base_delay
        while not stop.is_set():
            try:
                async with self.session.ws_connect(url, heartbeat=30) as ws:
                    delay = self.retry.base_delay
                    on_state(True)
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            on_message(json.loads(msg.data))
                        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                            break
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                log.info("websocket: %s", e)
            on_state(False)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, self.retry.max_delay)


def _json_or_text(body):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace")
