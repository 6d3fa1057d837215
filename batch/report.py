"""Rank a batch's output images with a reward model and write an HTML gallery sorted by reward."""
import html
import json
import math
import os

from ..training.checkpoints import atomic_write_text

REPORT = "report.html"
SCORES = "scores.jsonl"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def prompt_text(prompt):
    """The positive prompt of an API prompt: the ``text`` of the node linked to a sampler's ``positive`` input
    (through one level of conditioning nodes), else the first text-encoder text."""
    for node in prompt.values():
        link = node.get("inputs", {}).get("positive")
        if isinstance(link, list) and str(link[0]) in prompt:
            src = prompt[str(link[0])]["inputs"]
            if isinstance(src.get("text"), str):
                return src["text"]
    for node in prompt.values():
        if isinstance(node.get("inputs", {}).get("text"), str):
            return node["inputs"]["text"]
    return ""


def load_image_bchw(path):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def score_records(records, out_dir, reward, folder=None):
    """[{key, path, params, prompt, score}] for every image output of the successful records.
    ``reward``: a reward model name (loaded with rewards.load_reward) or an object with
    ``forward(images_bchw01, prompts) -> Tensor[B]``; ``folder``: where to look for its weights (besides
    $REWARDLAB_MODELS)."""
    import torch

    if isinstance(reward, str):
        from ..rewards import load_reward

        reward = load_reward(reward, device="cpu", folder=folder)
    items = []
    for rec in records:
        if rec.get("status") != "success":
            continue
        text = prompt_text(rec.get("prompt") or {})
        for out in rec.get("outputs", []):
            if out["path"].lower().endswith(IMAGE_EXTS):
                items.append({"key": rec["key"], "path": out["path"], "params": rec.get("params", {}), "prompt": text})
    with torch.no_grad():
        for item in items:  # one by one: outputs of a sweep may differ in size
            x = load_image_bchw(os.path.join(out_dir, item["path"]))
            item["score"] = float(reward.forward(x, [item["prompt"]]).reshape(-1)[0])
    items.sort(key=_best_first)
    return items


def _best_first(item):
    """Sort key: highest score first; a NaN score (a broken image or reward) ranks last, never first."""
    score = item["score"]
    return (1, 0.0) if score is None or math.isnan(score) else (0, -score)


def _score_text(score):
    return "NaN" if score is None or math.isnan(score) else f"{score:.4f}"


def _json_score(score):
    return None if score is None or not math.isfinite(score) else score  # NaN is not JSON: write null


def write_report(out_dir, scored, reward_name, title="RewardLab batch"):
    """scores.jsonl + report.html (a gallery sorted by reward, best first); returns the HTML path."""
    lines = "".join(json.dumps({"rank": rank, "reward": reward_name, **item, "score": _json_score(item["score"])},
                               ensure_ascii=False, allow_nan=False) + "\n" for rank, item in enumerate(scored, 1))
    atomic_write_text(os.path.join(out_dir, SCORES), lines)
    cards = []
    for rank, item in enumerate(scored, 1):
        params = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                         for k, v in item["params"].items())
        src = html.escape(item["path"].replace(os.sep, "/"), quote=True)
        cards.append(
            f'<figure><a href="{src}"><img src="{src}" loading="lazy"></a><figcaption>'
            f'<b>#{rank}</b> {html.escape(reward_name)} = {_score_text(item["score"])}<br>'
            f'<small>{html.escape(item["prompt"])}</small><table>{params}</table>'
            f'<small>run {html.escape(item["key"])}</small></figcaption></figure>')
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:1em}main{display:flex;flex-wrap:wrap;gap:12px}"
            "figure{margin:0;width:256px}img{width:256px;image-rendering:pixelated}"
            "table{font-size:12px;border-collapse:collapse}td{padding:0 4px;border:1px solid #ddd}</style>"
            f"<h1>{html.escape(title)}</h1><p>{len(scored)} images ranked by "
            f"<b>{html.escape(reward_name)}</b> (higher is better).</p><main>{''.join(cards)}</main>")
    path = os.path.join(out_dir, REPORT)
    atomic_write_text(path, page)   # a crash while writing leaves the previous report, never half a page
    return path
