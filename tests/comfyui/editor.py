"""Drive ComfyUI's real editor (the frontend package a server serves) in headless Chromium, for tests and for
recording fixtures.

Chromium comes from Debian (``apt-get install chromium``); Playwright (pip) drives it through
``executable_path``, since Playwright cannot download a browser here. ``Editor`` opens a server's page, waits for
the app, and offers what the tests need: drop a workflow file on the canvas as a user would, read the live graph
(node boxes, link counts, node types the frontend does not know), run the frontend's own ``graphToPrompt``,
create nodes, and take screenshots.
"""
import json
import os
import shutil

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path():
    """The system Chromium, or None ($REWARDLAB_CHROMIUM overrides)."""
    for path in (os.environ.get("REWARDLAB_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if path and os.path.exists(path):
            return path
    return None


# Every node of the live graph and of its subgraph definitions, with the frontend's own sizes; links per graph.
_GRAPH_STATE = """
() => {
  const graphs = [app.graph, ...((app.graph.subgraphs && [...app.graph.subgraphs.values()]) || [])];
  const known = new Set(Object.keys(LiteGraph.registered_node_types));
  const subgraphIds = new Set(graphs.slice(1).map(g => g.id));
  return graphs.map(g => ({
    id: g.id || null,
    nodes: g.nodes.map(n => ({
      id: n.id, type: n.type, mode: n.mode, title: n.title,
      known: known.has(n.type) || subgraphIds.has(n.type),
      box: n.boundingRect ? [...n.boundingRect] : [n.pos[0], n.pos[1], n.size[0], n.size[1]],
      collapsed: !!(n.flags && n.flags.collapsed),
    })),
    links: (g.links instanceof Map ? g.links.size : Object.keys(g.links || {}).length),
    groups: (g._groups || g.groups || []).map(gr => ({title: gr.title, box: [...gr._bounding]})),
  }));
}
"""

_DROP = """
async ([text, name]) => {
  const file = new File([text], name, {type: 'application/json'});
  const dt = new DataTransfer();
  dt.items.add(file);
  const target = document.querySelector('#graph-canvas') || document.body;
  target.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
}
"""


class Editor:
    """One headless Chromium page on a ComfyUI server's editor. Use as a context manager."""

    def __init__(self, url, viewport=(1600, 1000), timeout_s=180):
        from playwright.sync_api import sync_playwright

        self.url = url.rstrip("/")
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=chromium_path(),
                                                args=["--no-sandbox", "--disable-gpu"])
        self.page = self.browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.console = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.responses = []          # (status, url) of every response the page received
        self.page.on("response", lambda r: self.responses.append((r.status, r.url)))
        self.page.goto(self.url, timeout=timeout_s * 1000)
        self.page.wait_for_function(
            "window.app && window.app.graph && window.LiteGraph && "
            "Object.keys(window.LiteGraph.registered_node_types).length > 50", timeout=timeout_s * 1000)
        self.page.wait_for_timeout(500)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.browser.close()
        self._pw.stop()

    @property
    def failed_requests(self):
        return [(status, url) for status, url in self.responses if status >= 400]

    def evaluate(self, script, arg=None):
        return self.page.evaluate(script, arg)

    # --- workflows ------------------------------------------------------------------------------------------------
    def drop_workflow(self, workflow, name="workflow.json"):
        """Drop a workflow file on the canvas, as a user dragging it in from the file manager."""
        self.evaluate("() => app.graph.clear()")
        self.evaluate(_DROP, [json.dumps(workflow), name])
        self.page.wait_for_function("(n) => app.graph.nodes.length >= n", arg=min(1, len(workflow.get("nodes", []))),
                                    timeout=60000)
        self.page.wait_for_timeout(300)
        self.close_dialogs()

    def load(self, workflow):
        """Load a workflow through the app (no file drop), as the template browser does."""
        self.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'fixture'); }", workflow)
        self.page.wait_for_timeout(200)
        self.close_dialogs()

    def close_dialogs(self):
        """Close the missing-nodes / missing-models dialogs the editor may open after loading."""
        for _ in range(3):
            dialogs = self.page.locator(".p-dialog")
            if not dialogs.count():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(150)

    def graph_state(self):
        return self.evaluate(_GRAPH_STATE)

    def graph_to_prompt(self):
        """The frontend's own conversion of the live graph: {"workflow": editor JSON, "output": API prompt}."""
        return self.evaluate("async () => { const r = await app.graphToPrompt(); "
                             "return {workflow: r.workflow, output: r.output}; }")

    def serialize(self):
        return self.evaluate("() => app.graph.serialize()")

    def screenshot(self, path, full_page=False):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.page.screenshot(path=path, full_page=full_page)
        return path

    def fit_view(self):
        """Zoom the canvas so the whole graph is visible (the editor's 'Zoom to fit' command)."""
        self.evaluate("() => { app.canvas.deselectAll(); "
                      "app.extensionManager.command.execute('Comfy.Canvas.FitView'); return 1; }")
        self.page.wait_for_timeout(900)
