"""Generate RewardLab's shipped workflows from one description each, in both formats:

- editor format (nodes + links, what the ComfyUI editor saves and loads) -> ``example_workflows/<title>.json``,
  the folder ComfyUI's template browser serves for custom packs (``app/custom_node_manager.py``). The browser shows
  a pack's template by its file name (title and description) and ``<title>.jpg`` beside it as the thumbnail
  (written by ``workflows/thumbnails.py``), so file names are the titles;
- API format (what ``POST /prompt`` and ``rewardlab run`` take) -> ``workflows/api/<name>.json``.

Nodes are laid out automatically: columns by dependency depth, a horizontal band per group (so a group's box holds
only its members), node sizes estimated from their widgets the way the editor sizes them, with margin
(``node_size``). ``tests/test_workflows.py`` checks that no two nodes overlap and that groups enclose their nodes.

    python workflows/build.py            # (re)write every workflow
    python workflows/build.py --check    # exit 1 if a shipped file differs from what would be written

Node specs (widget order, defaults, socket types) come from our NODE_CLASS_MAPPINGS and the stock table
(rewardlab.batch.stock_nodes), so the files follow the nodes when their inputs change: rerun this script.
"""
import json
import os
import sys

from rewardlab.batch.widgets import (default_value, input_specs, is_widget, saved_widgets, ui_default,
                                     widget_layout)
from rewardlab.batch.stock_nodes import offline_object_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDITOR_DIR = os.path.join(ROOT, "example_workflows")
API_DIR = os.path.join(ROOT, "workflows", "api")
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # users pick their own model in the loader


class Out:
    def __init__(self, node, slot):
        self.node, self.slot = node, slot


MUTED = 2  # litegraph node mode "never": shown in the editor, left out of the prompt


class Node:
    def __init__(self, nid, class_type, title, inputs):
        self.id, self.class_type, self.title, self.inputs = nid, class_type, title, inputs
        self.mode = 0

    def __getitem__(self, slot):
        return Out(self, slot)


class Primitive:
    """A frontend PrimitiveNode: one value written into several widgets (e.g. a prompt shared by two nodes)."""

    def __init__(self, nid, title, value):
        self.id, self.title, self.value, self.targets = nid, title, value, []


# Editor geometry (litegraph): a node's title bar sits above its position; sizes exclude it.
TITLE_H, SLOT_H, WIDGET_H, TEXTBOX_H, TEXT_NODE_MIN_H = 30, 20, 24, 110, 220
GAP_X, GAP_Y, GROUP_PAD, GROUP_HEADER, NOTE_SIZE = 60, 40, 20, 50, (560, 230)


def node_size(spec, class_type, inputs):
    """[width, height] the editor will give a node, estimated with margin from its sockets and widgets: a slot
    row per socket (inputs and outputs side by side), a widget row per widget, a text box per multiline string or
    display (PreviewAny's text; a node with one is at least 200 px high in the editor)."""
    widgets = widget_layout(spec, class_type)
    boxes = sum(1 for w in widgets if (w.kind == "value" and (w.opts or {}).get("multiline")) or w.kind == "ui")
    rows = len(widgets) - boxes
    slots = max(len(inputs), len(spec.get("output") or []))
    width = 400 if boxes else 320
    height = SLOT_H * slots + WIDGET_H * rows + TEXTBOX_H * boxes + 20
    return [width, max(height, TEXT_NODE_MIN_H) if boxes else height]


class Graph:
    def __init__(self, name, title, note=""):
        self.name, self.title, self.note = name, title, note
        self.nodes, self.primitives, self.groups = [], [], []

    def add(self, class_type, title=None, **inputs):
        node = Node(len(self.nodes) + len(self.primitives) + 1, class_type, title, inputs)
        self.nodes.append(node)
        return node

    def primitive(self, title, value):
        prim = Primitive(len(self.nodes) + len(self.primitives) + 1, title, value)
        self.primitives.append(prim)
        return prim

    def group(self, title, *nodes):
        self.groups.append((title, nodes))

    def mute(self, *nodes):
        """Ship nodes muted (e.g. a branch that needs a file an earlier run writes): the editor shows them, the
        prompt leaves them out, as the frontend does."""
        for node in nodes:
            node.mode = MUTED

    # --- API format --------------------------------------------------------------------------------------------
    def values(self, node, info):
        """Widget values of a node: given ones (primitive values resolved), defaults for the rest."""
        out = {}
        for name, typ, opts in input_specs(info[node.class_type]):
            if not is_widget(typ, opts):
                continue
            value = node.inputs[name] if name in node.inputs else default_value(typ, opts)
            if isinstance(value, Primitive):
                value = value.value
            if not isinstance(value, Out):
                out[name] = value
        return out

    def api(self, info):
        prompt = {}
        muted = {node.id for node in self.nodes if node.mode == MUTED}
        for node in self.nodes:
            if node.id in muted:
                continue
            spec = info[node.class_type]
            unknown = set(node.inputs) - {name for name, _, _ in input_specs(spec)}
            if unknown:
                raise ValueError(f"{self.name}: {node.class_type} has no inputs {sorted(unknown)}")
            inputs = self.values(node, info)
            for name, value in node.inputs.items():
                if isinstance(value, Out) and value.node.id not in muted:
                    inputs[name] = [str(value.node.id), value.slot]
            prompt[str(node.id)] = {"inputs": inputs, "class_type": node.class_type,
                                    "_meta": {"title": node.title or spec.get("display_name") or node.class_type}}
        return prompt

    # --- editor format -----------------------------------------------------------------------------------------
    def editor(self, info):
        links, incoming = [], {}   # incoming[(node id, input name)] = link id
        outgoing = {}              # outgoing[(node id, slot)] = [link ids]

        def link(src_id, slot, dst, name, typ):
            lid = len(links) + 1
            links.append([lid, src_id, slot, dst.id, None, typ])  # target slot is filled in below
            incoming[(dst.id, name)] = lid
            outgoing.setdefault((src_id, slot), []).append(lid)

        for node in self.nodes:
            for name, value in node.inputs.items():
                if isinstance(value, Out):
                    link(value.node.id, value.slot, node, name, info[value.node.class_type]["output"][value.slot])
                elif isinstance(value, Primitive):
                    spec = dict((n, t) for n, t, _ in input_specs(info[node.class_type]))
                    link(value.id, 0, node, name, "COMBO" if isinstance(spec[name], list) else spec[name])
                    value.targets.append((node, name))
        editor_nodes = {node.id: self._editor_node(node, info, order, links, incoming, outgoing)
                        for order, node in enumerate(self.nodes)}
        editor_nodes.update({prim.id: self._primitive_node(prim, info, outgoing) for prim in self.primitives})
        if self.note:
            note = self._note_node()
            editor_nodes[note["id"]] = note
        positions, group_boxes = self._layout(editor_nodes)
        for nid, node in editor_nodes.items():
            node["pos"] = positions[nid]
        nodes = ([editor_nodes[max(editor_nodes)]] if self.note else []) + \
            [editor_nodes[n.id] for n in self.nodes] + [editor_nodes[p.id] for p in self.primitives]
        groups = [{"title": title, "bounding": box, "color": "#3f789e", "font_size": 24, "flags": {}}
                  for (title, _), box in zip(self.groups, group_boxes)]
        last_id = max([n["id"] for n in nodes] + [0])
        return {"last_node_id": last_id, "last_link_id": len(links), "nodes": nodes, "links": links,
                "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}

    def _editor_node(self, node, info, order, links, incoming, outgoing):
        spec = info[node.class_type]
        inputs = []
        for name, typ, opts in input_specs(spec):
            linked = incoming.get((node.id, name))
            if is_widget(typ, opts) and linked is None:
                continue
            entry = {"name": name, "type": "COMBO" if isinstance(typ, list) else typ, "link": linked}
            if is_widget(typ, opts):
                entry["widget"] = {"name": name}
            if linked is not None:
                links[linked - 1][4] = len(inputs)
            inputs.append(entry)
        sockets = [name for name, typ, opts in input_specs(spec) if not is_widget(typ, opts)]
        outputs = [{"name": spec["output_name"][i], "type": t, "links": outgoing.get((node.id, i), []),
                    "slot_index": i} for i, t in enumerate(spec["output"])]
        values = self.values(node, info)
        widgets = [values[w.input] if w.sent else ui_default(w) for w in saved_widgets(spec, node.class_type)]
        out = {"id": node.id, "type": node.class_type, "pos": [0, 0],
               "size": node_size(spec, node.class_type, sockets), "flags": {}, "order": order, "mode": node.mode,
               "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": node.class_type},
               "widgets_values": widgets}
        if node.title and node.title != spec.get("display_name"):
            out["title"] = node.title
        return out

    def _primitive_node(self, prim, info, outgoing):
        node, name = prim.targets[0]
        typ, opts = next((t, o) for n, t, o in input_specs(info[node.class_type]) if n == name)
        slots = saved_widgets(info[node.class_type], node.class_type)
        has_control = any(w.kind == "control" and slots[i - 1].input == name for i, w in enumerate(slots) if i)
        kind = "COMBO" if isinstance(typ, list) else typ
        size = [400, TEXTBOX_H + 40] if kind == "STRING" else [320, 2 * WIDGET_H + SLOT_H + 20]
        return {"id": prim.id, "type": "PrimitiveNode", "pos": [0, 0], "size": size,
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [],
                "outputs": [{"name": kind, "type": kind, "links": outgoing.get((prim.id, 0), []),
                             "slot_index": 0, "widget": {"name": name}}],
                "title": prim.title, "properties": {"Run widget replace on values": False},
                "widgets_values": [prim.value] + (["fixed"] if has_control else [])}

    def _note_node(self):
        return {"id": len(self.nodes) + len(self.primitives) + 1, "type": "Note", "pos": [0, 0],
                "size": list(NOTE_SIZE), "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                "title": "How to use", "properties": {"text": ""}, "widgets_values": [self.note],
                "color": "#432", "bgcolor": "#653"}

    def _depths(self):
        """Column of every node: 1 + the deepest node it reads from; a source moves right to sit just left of
        its nearest consumer; primitives and the note take column 0."""
        depth, children = {}, {}
        for node in self.nodes:
            for value in node.inputs.values():
                if isinstance(value, Out):
                    children.setdefault(value.node.id, []).append(node)

        def node_depth(node):
            if node.id not in depth:
                parents = [v.node for v in node.inputs.values() if isinstance(v, Out)]
                depth[node.id] = 1 + max((node_depth(p) for p in parents), default=0)
            return depth[node.id]

        for node in self.nodes:
            node_depth(node)
        for node in self.nodes:
            if not any(isinstance(v, Out) for v in node.inputs.values()) and node.id in children:
                depth[node.id] = max(1, min(depth[c.id] for c in children[node.id]) - 1)
        return depth

    def _layout(self, editor_nodes):
        """Positions {id: [x, y]} and group boxes. Bands top to bottom: the note, the ungrouped nodes, then one
        band per group; inside a band, columns by depth (shared by all bands), nodes stacked by their size."""
        depth = self._depths()
        for prim in self.primitives:
            depth[prim.id] = 0
        band_of = {}
        for index, (_, members) in enumerate(self.groups, 1):
            for m in members:
                band_of.setdefault(m.id, index)
        bands = [[] for _ in range(len(self.groups) + 1)]
        for nid in [p.id for p in self.primitives] + [n.id for n in self.nodes]:
            bands[band_of.get(nid, 0)].append(nid)
        widths = {}
        for nid, col in depth.items():
            widths[col] = max(widths.get(col, 0), editor_nodes[nid]["size"][0])
        xs, x = {}, 0
        for col in range(max(widths, default=0) + 1):
            xs[col] = x
            x += widths.get(col, 0) + GAP_X
        pos, boxes, top = {}, [], 0
        if self.note:
            note_id = max(editor_nodes)
            pos[note_id] = [0, top + TITLE_H]
            top += TITLE_H + NOTE_SIZE[1] + GAP_Y
        for band, members in enumerate(bands):
            if not members:
                if band:
                    boxes.append([0, top, 0, 0])
                continue
            start = top + (GROUP_HEADER if band else 0)
            bottoms = {}
            for nid in members:
                col = depth[nid]
                y = bottoms.get(col, start) + TITLE_H
                pos[nid] = [xs[col], y]
                bottoms[col] = y + editor_nodes[nid]["size"][1] + GAP_Y
            bottom = max(bottoms.values()) - GAP_Y
            if band:
                left = min(pos[n][0] for n in members) - GROUP_PAD
                right = max(pos[n][0] + editor_nodes[n]["size"][0] for n in members) + GROUP_PAD
                boxes.append([left, top, right - left, bottom + GROUP_PAD - top])
                bottom += GROUP_PAD
            top = bottom + GAP_Y + (GROUP_PAD if band else 0)
        return pos, boxes


# --- the workflows -----------------------------------------------------------------------------------------------

WORKFLOWS = {}   # name -> function returning its Graph; the Graph's title is the editor file's name


def workflow(title):
    def register(fn):
        fn.title = title
        WORKFLOWS[fn.__name__] = fn
        return fn
    return register


def txt2img(g, prompt, negative="blurry, low quality, watermark", batch_size=1, share_prompt=False):
    """Checkpoint, prompts and an empty latent: (loader, positive, negative, latent, prompt). With
    ``share_prompt`` the prompt is a PrimitiveNode, to feed the same text to a reward node too."""
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    text = g.primitive("Prompt", prompt) if share_prompt else prompt
    pos = g.add("CLIPTextEncode", "Positive", text=text, clip=ckpt[1])
    neg = g.add("CLIPTextEncode", "Negative", text=negative, clip=ckpt[1])
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=batch_size)
    return ckpt, pos, neg, latent, text


def sample_and_decode(g, model, pos, neg, latent, vae, title=None, cfg=7.0, scheduler="normal"):
    """Stock KSampler (seed 0, 20 euler steps) -> VAEDecode; returns (sampler, decode)."""
    sampler = g.add("KSampler", title, model=model, positive=pos[0], negative=neg[0], latent_image=latent[0],
                    seed=0, steps=20, cfg=cfg, sampler_name="euler", scheduler=scheduler, denoise=1.0)
    return sampler, g.add("VAEDecode", samples=sampler[0], vae=vae)


@workflow("Score and rank a batch with a reward model")
def score_and_rank():
    g = Graph("score_and_rank", score_and_rank.title, note=(
        "Score and rank a batch with a reward model.\n\n1. Pick your SD1.5 checkpoint in Load Checkpoint.\n"
        "2. Put the reward weights in models/rewards (see the README) and pick the reward in Load Reward Model.\n"
        "3. Queue: KSampler makes 4 candidates, Rank Images keeps the best, the table shows every score.\n\n"
        "Batch runs: rewardlab run workflows/api/score_and_rank.json --server http://127.0.0.1:8188 "
        "--set KSampler.seed=1..8"))
    ckpt, pos, neg, latent, text = txt2img(g, "a photo of a red fox in the snow, golden hour", batch_size=4,
                                           share_prompt=True)
    sampler, decode = sample_and_decode(g, ckpt[0], pos, neg, latent, ckpt[2])
    reward = g.add("RewardLabLoadReward", model_name="aesthetic-v2")
    rank = g.add("RewardLabRankImages", reward=reward[0], images=decode[0], prompts=text, top_k=1,
                 order="best first", latent=sampler[0])
    g.add("SaveImage", "Save best", images=rank[0], filename_prefix="rewardlab/best")
    g.add("PreviewImage", "All candidates", images=decode[0])
    g.add("PreviewAny", "Scores", source=rank[3])
    g.group("Score and rank", reward, rank)
    return g


@workflow("Inspect rewards (scores, gradient heatmaps, combined rewards)")
def inspect_rewards():
    g = Graph("inspect_rewards", inspect_rewards.title, note=(
        "Look inside the rewards before you optimise them.\n\n"
        "Combine Rewards mixes a learned reward (aesthetic) with a weight-free one (colourfulness, 0.5); Score "
        "Images lists every image's score; Reward Gradient shows where the reward would change each image (the "
        "heatmap) and overlays it. Pick your checkpoint and reward.\n\n"
        "Unload Reward Models frees the cached reward models: it ships muted (it would run in any order with the "
        "rest); unmute it and queue once when you need the memory back."))
    ckpt, pos, neg, latent, text = txt2img(g, "a bowl of lemons on a blue table, photo", batch_size=4,
                                           share_prompt=True)
    sampler, decode = sample_and_decode(g, ckpt[0], pos, neg, latent, ckpt[2])
    learned = g.add("RewardLabLoadReward", model_name="aesthetic-v2")
    colour = g.add("RewardLabWeightFreeReward", kind="colourfulness")
    combined = g.add("RewardLabCombineRewards", reward_1=learned[0], weight_1=1.0, reward_2=colour[0],
                     weight_2=0.5, normalise="range")
    scores = g.add("RewardLabScoreImages", reward=combined[0], images=decode[0], prompts=text)
    g.add("PreviewAny", "Score table", source=scores[2])
    gradient = g.add("RewardLabRewardGradient", reward=learned[0], images=decode[0], prompts=text,
                     mode="magnitude", overlay_strength=0.6, gamma=0.5)
    g.add("PreviewImage", "Gradient heatmaps", images=gradient[0])
    g.add("PreviewImage", "Heatmaps over the images", images=gradient[1])
    unload = g.add("RewardLabUnloadRewards", "Unload reward models (muted)", model_name="all")
    g.mute(unload)
    g.group("Rewards", learned, colour, combined, scores, gradient)
    return g


def custom_sampling(g, model, guider, latent, vae, prefix, steps=20, seed=0, sampler=None):
    """RandomNoise + a SAMPLER (KSamplerSelect unless given) + BasicScheduler into SamplerCustomAdvanced, decoded
    and saved. Returns (sigmas node, sampler node)."""
    noise = g.add("RandomNoise", noise_seed=seed)
    select = sampler or g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=model, scheduler="karras", steps=steps, denoise=1.0)
    sample = g.add("SamplerCustomAdvanced", noise=noise[0], guider=guider, sampler=select[0], sigmas=sigmas[0],
                   latent_image=latent)
    decode = g.add("VAEDecode", samples=sample[0], vae=vae)
    g.add("SaveImage", images=decode[0], filename_prefix=prefix)
    return sigmas, sample


def resample(g, ckpt, pos, neg, latent, noise, cfg, steps, scheduler, prefix, title=None):
    """Stock SamplerCustomAdvanced fed with a NOISE: same model, conds, cfg, sampler and sigmas as the
    optimiser, so it reproduces the optimised image. Returns the nodes it adds."""
    guider = g.add("CFGGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=cfg)
    select = g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=ckpt[0], scheduler=scheduler, steps=steps, denoise=1.0)
    sample = g.add("SamplerCustomAdvanced", title, noise=noise, guider=guider[0], sampler=select[0],
                   sigmas=sigmas[0], latent_image=latent[0])
    decode = g.add("VAEDecode", samples=sample[0], vae=ckpt[2])
    save = g.add("SaveImage", images=decode[0], filename_prefix=prefix)
    return [guider, select, sigmas, sample, decode, save]


@workflow("Optimise the starting noise for a reward (ReNO)")
def reno_noise():
    g = Graph("reno_noise", reno_noise.title, note=(
        "ReNO (Eyring et al. 2024): optimise the initial noise by gradient ascent on a reward, then sample it with "
        "stock SamplerCustomAdvanced.\n\nMeant for one/few-step models: pick e.g. SD-Turbo in Load Checkpoint "
        "(cfg 1, 1 step). ReNO's NOISE output carries the optimised tensor; the stock sampler below uses the same "
        "model, prompts, cfg, sampler and sigmas, so it reproduces the optimised image. Put the reward weights in "
        "models/rewards and pick the reward in Load Reward Model (HPS v2.1 reads the prompt)."))
    ckpt, pos, neg, latent, text = txt2img(g, "a red panda reading a book under a lamp, digital art",
                                           share_prompt=True)
    reward = g.add("RewardLabLoadReward", model_name="hps-v2.1")
    reno = g.add("RewardLabReNOOptimiseNoise", model=ckpt[0], positive=pos[0], negative=neg[0], vae=ckpt[2],
                 latent=latent[0], reward=reward[0], steps=1, sampler="euler", scheduler="normal", cfg=1.0, seed=0,
                 batch=1, iterations=50, lr=5.0, reg_weight=0.01, prompt=text)
    g.add("PreviewImage", "Reward per iteration", images=reno[3])
    resample(g, ckpt, pos, neg, latent, reno[0], cfg=1.0, steps=1, scheduler="normal",
             prefix="rewardlab/reno")
    g.group("ReNO", reward, reno)
    return g


@workflow("Search many starting noises for the best reward")
def noise_search():
    g = Graph("noise_search", noise_search.title, note=(
        "Noise search: try many initial noises (random, zero-order neighbourhood or search over paths), keep the "
        "one with the best reward, and sample it with stock SamplerCustomAdvanced.\n\nNo gradients, so any "
        "model and any reward works; the cost is `budget` full samplings. Pick your checkpoint and reward.\n\n"
        "The muted group starts from a noise of your own instead: a .latent file of unit-variance noise in "
        "ComfyUI's input folder, wrapped by Noise from Latent (unmute it once the file is there)."))
    ckpt, pos, neg, latent, text = txt2img(g, "a lighthouse on a rocky coast at sunset, oil painting",
                                           share_prompt=True)
    reward = g.add("RewardLabLoadReward", model_name="aesthetic-v2")
    search = g.add("RewardLabNoiseSearch", model=ckpt[0], positive=pos[0], negative=neg[0], vae=ckpt[2],
                   latent=latent[0], reward=reward[0], steps=20, sampler="euler", scheduler="normal", cfg=7.0, seed=0,
                   batch=1, method="random", budget=16, prompt=text)
    g.add("PreviewImage", "Scores of the candidates", images=search[3])
    g.add("PreviewAny", "Best score", source=search[4])
    resample(g, ckpt, pos, neg, latent, search[0], cfg=7.0, steps=20, scheduler="normal",
             prefix="rewardlab/noise_search")
    saved = g.add("LoadLatent", "Load a saved noise", latent="my_noise.latent")
    wrapped = g.add("RewardLabNoiseFromLatent", latent=saved[0], seed=0)
    replay = [saved, wrapped] + resample(g, ckpt, pos, neg, latent, wrapped[0], cfg=7.0, steps=20,
                                         scheduler="normal", prefix="rewardlab/own_noise",
                                         title="SamplerCustomAdvanced (own noise)")
    g.mute(*replay)
    g.group("Noise search", reward, search)
    g.group("Start from your own noise (muted: needs input/my_noise.latent)", *replay)
    return g


@workflow("Change the guidance over the steps (Scheduled Guider)")
def scheduled_guidance_guider():
    g = Graph("scheduled_guidance_guider", scheduled_guidance_guider.title, note=(
        "Guidance that changes over the steps, as a GUIDER for SamplerCustomAdvanced.\n\n"
        "Guidance Schedule (Wang et al.) makes a CFG schedule (here linear, mean scale 7.5); Scheduled Guider "
        "applies it per step (combiner: cfg, APG, CFG-Zero*, rescale). The plots show the scale per step and "
        "per sigma. Pick your SD1.5 checkpoint in Load Checkpoint."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a watercolor painting of a lighthouse on a cliff")
    schedule = g.add("RewardLabGuidanceWang", family="linear", cfg=7.5, floor=2.0, power=1.0, axis="p_step")
    guider = g.add("RewardLabScheduledGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=7.5,
                   combiner="cfg", cfg_schedule=schedule[0])
    sigmas, _ = custom_sampling(g, ckpt[0], guider[0], latent[0], ckpt[2], "rewardlab/scheduled_guidance")
    plot = g.add("RewardLabPlotGuidanceSchedule", model=ckpt[0], sigmas=sigmas[0], cfg=7.5, cfg_schedule=schedule[0])
    g.add("PreviewImage", "Schedule by step", images=plot[0])
    g.group("Guidance schedule", schedule, guider)
    return g


@workflow("Build a guidance schedule from shapes, keyframes and math")
def guidance_schedule_toolkit():
    g = Graph("guidance_schedule_toolkit", guidance_schedule_toolkit.title, note=(
        "The schedule building blocks, combined into one CFG schedule.\n\n"
        "A cosine ramp (Shape) and a keyframed curve are combined with min (Math), then rescaled so the mean cfg "
        "is 7 (Transform): the image gets the same total guidance as cfg 7, spent differently over the steps. "
        "Scheduled Guider applies it; the plot shows it per step and per sigma.\n\n"
        "Below: any SIGMAS curve can be a schedule too (Guidance Schedule from SIGMAS): here a Karras curve from 9 "
        "down to 2, plotted; connect it to the guider's cfg_schedule to use it. The RewardLab Sampler runs the "
        "steps (euler_ancestral)."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a misty pine forest at dawn, photo")
    ramp = g.add("RewardLabGuidanceShape", shape="cosine", start=3.0, end=9.0, power=1.0, floor=0.0, center=0.5,
                 axis="p_step")
    keys = g.add("RewardLabGuidanceKeyframes", keyframes="0:9.0, 0.4:7.0, 1:3.0", axis="p_step",
                 interpolation="linear")
    lower = g.add("RewardLabGuidanceMath", operation="min", a=1.0, b=1.0, a_schedule=ramp[0], b_schedule=keys[0])
    scaled = g.add("RewardLabGuidanceTransform", schedule=lower[0], transform="normalize_mean", target=7.0)
    guider = g.add("RewardLabScheduledGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=7.0,
                   combiner="cfg", cfg_schedule=scaled[0])
    sampler = g.add("RewardLabSampler", sampler_name="euler_ancestral", eta=-1.0)
    sigmas, _ = custom_sampling(g, ckpt[0], guider[0], latent[0], ckpt[2], "rewardlab/schedule_toolkit",
                                sampler=sampler)
    plot = g.add("RewardLabPlotGuidanceSchedule", model=ckpt[0], sigmas=sigmas[0], cfg=7.0, cfg_schedule=scaled[0])
    g.add("PreviewImage", "Combined schedule", images=plot[0])
    curve = g.add("KarrasScheduler", "A cfg curve (Karras shape, 9 to 2)", steps=20, sigma_max=9.0, sigma_min=2.0,
                  rho=3.0)
    from_sigmas = g.add("RewardLabGuidanceFromSigmas", weights=curve[0])
    plot_curve = g.add("RewardLabPlotGuidanceSchedule", model=ckpt[0], sigmas=sigmas[0], cfg=7.0,
                       cfg_schedule=from_sigmas[0])
    g.add("PreviewImage", "Curve from SIGMAS", images=plot_curve[0])
    g.group("Schedule building blocks", ramp, keys, lower, scaled, guider)
    g.group("A schedule from any SIGMAS curve", curve, from_sigmas, plot_curve)
    return g


@workflow("Guidance only in a sigma interval (KSampler model patch)")
def guidance_model_patch():
    g = Graph("guidance_model_patch", guidance_model_patch.title, note=(
        "The same guidance schedules as a MODEL patch, so the stock KSampler uses them.\n\n"
        "Guidance Interval applies CFG 7 only for sigmas in [0.28, 5.42] (Kynkaanniemi et al.) and 1 outside; "
        "Apply Guidance Schedule patches the model's CFG function. KSampler's cfg must stay above 1 (at 1 it "
        "skips the unconditional pass). Pick your SD1.5 checkpoint in Load Checkpoint."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a cozy cabin in a snowy forest at night, warm light")
    schedule = g.add("RewardLabGuidanceInterval", cfg=7.0, low=0.28, high=5.42, axis="sigma_edm", outside=1.0)
    patched = g.add("RewardLabApplyGuidanceSchedule", model=ckpt[0], combiner="cfg", cfg_schedule=schedule[0])
    sampler, decode = sample_and_decode(g, patched[0], pos, neg, latent, ckpt[2], scheduler="karras")
    g.add("SaveImage", images=decode[0], filename_prefix="rewardlab/guidance_patch")
    g.group("Guidance as a model patch", schedule, patched)
    return g


@workflow("Steer sampling with a reward gradient (Reward Guidance)")
def reward_guidance():
    g = Graph("reward_guidance", reward_guidance.title, note=(
        "Reward guidance: each step nudges the sample along the gradient of a reward of its decoded x0 "
        "(between start and end of the schedule).\n\nReward Guidance wraps any GUIDER (here CFGGuider). Put the "
        "reward weights in models/rewards and pick the reward in Load Reward Model; the prompt is shared with "
        "the text encoder. Memory: the reward gradient goes through the VAE decoder. recurrence = 2 is universal "
        "guidance's self-recurrence: each guided step is taken, re-noised and guided again (2x the cost; 1 = off)."))
    ckpt, pos, neg, latent, text = txt2img(g, "a bowl of ripe peaches on a wooden table, soft window light",
                                           share_prompt=True)
    cfg = g.add("CFGGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=7.0)
    reward = g.add("RewardLabLoadReward", model_name="aesthetic-v2")
    guided = g.add("RewardLabRewardGuider", guider=cfg[0], vae=ckpt[2], reward=reward[0], prompt=text, strength=1.0,
                   start=0.0, end=0.8, backward_steps=0, backward_lr=0.1, gradient="x0 only", recurrence=2)
    custom_sampling(g, ckpt[0], guided[0], latent[0], ckpt[2], "rewardlab/reward_guidance")
    g.group("Reward guidance", cfg, reward, guided)
    return g


@workflow("More diverse samples at high guidance (CADS)")
def cads():
    g = Graph("cads", cads.title, note=(
        "CADS (condition-annealed sampling, Sadat et al. 2024): noise is added to the conditioning early in "
        "sampling (annealed between tau1 and tau2) for more diverse samples at high guidance.\n\n"
        "CADS wraps any GUIDER. Sweep seeds to see the diversity: rewardlab run workflows/api/cads.json "
        "--server http://127.0.0.1:8188 --set RandomNoise.noise_seed=1..8"))
    ckpt, pos, neg, latent, _ = txt2img(g, "a portrait photo of an astronaut, studio lighting", batch_size=2)
    cfg = g.add("CFGGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=9.0)
    annealed = g.add("RewardLabCADSGuider", guider=cfg[0], tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0, seed=0,
                     axis="p_step")
    custom_sampling(g, ckpt[0], annealed[0], latent[0], ckpt[2], "rewardlab/cads")
    g.group("CADS", cfg, annealed)
    return g


@workflow("Sharper structure with perturbed-attention guidance (PAG)")
def perturbed_attention_guidance():
    g = Graph("perturbed_attention_guidance", perturbed_attention_guidance.title, note=(
        "Perturbed-Attention Guidance (Ahn et al. 2024) on top of CFG: one more conditional model call per step "
        "with the middle block's self-attention replaced by the identity, D += s*(D_cond - D_perturbed).\n\n"
        "The PAG scale follows a schedule here (5 at the first step down to 1 at the last: structure early, "
        "detail late); disconnect it to use the constant scale widget. Pick your SD1.5 or SDXL checkpoint."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a red vintage car parked in front of a bakery, photo")
    cfg = g.add("CFGGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=5.0)
    schedule = g.add("RewardLabGuidanceShape", "PAG scale schedule", shape="linear", start=5.0, end=1.0)
    pag = g.add("RewardLabPAGGuider", guider=cfg[0], scale=3.0, layers="middle.0", start=0.0, end=1.0,
                scale_schedule=schedule[0])
    custom_sampling(g, ckpt[0], pag[0], latent[0], ckpt[2], "rewardlab/pag")
    g.group("Perturbed-attention guidance", cfg, schedule, pag)
    return g


@workflow("Skip-layer guidance for SD3.5 and other DiTs (SLG)")
def skip_layer_guidance():
    g = Graph("skip_layer_guidance", skip_layer_guidance.title, note=(
        "Skip-Layer Guidance (Stability AI, SD3.5): one more conditional model call per step with DiT blocks 7, 8 "
        "and 9 skipped, D += 2.8*(D_cond - D_skipped), for step fractions between 0.01 and 0.2 (Stability's SD3.5 "
        "Medium values).\n\nFor DiT models only (SD3/SD3.5, Flux); pick an SD3.5 Medium checkpoint that includes "
        "its text encoders. The Scheduled Guider supplies CFG 4.5; SLG wraps it."))
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors")
    pos = g.add("CLIPTextEncode", "Positive", text="a glass teapot on a windowsill, morning light, photo",
                clip=ckpt[1])
    neg = g.add("CLIPTextEncode", "Negative", text="", clip=ckpt[1])
    latent = g.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    guider = g.add("RewardLabScheduledGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=4.5)
    slg = g.add("RewardLabSLGGuider", guider=guider[0], scale=2.8, layers="7, 8, 9", start=0.01, end=0.2)
    custom_sampling(g, ckpt[0], slg[0], latent[0], ckpt[2], "rewardlab/slg", steps=40)
    g.group("Skip-layer guidance", guider, slg)
    return g


@workflow("Skip half the negative-prompt evaluations (LinearAG)")
def linear_ag():
    g = Graph("linear_ag", linear_ag.title, note=(
        "LinearAG (Castillo et al., the affine variant of Adaptive Guidance): on every other step of the first "
        "half the negative prompt is not evaluated but estimated from the current and previous predictions.\n\n"
        "The first run with a given step count calibrates the estimate (full cost); queue again (e.g. another seed) "
        "and those runs skip the evaluations. Pick your checkpoint; compare with linear_ag off."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a misty pine forest at dawn, landscape photo")
    guider = g.add("RewardLabScheduledGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=7.0,
                   linear_ag=True)
    custom_sampling(g, ckpt[0], guider[0], latent[0], ckpt[2], "rewardlab/linear_ag")
    g.group("LinearAG", guider)
    return g


@workflow("Optimised 10-step sampling schedules (Align Your Steps)")
def align_your_steps():
    g = Graph("align_your_steps", align_your_steps.title, note=(
        "Align Your Steps (Sabour et al. 2024): NVIDIA's optimised 10-step sigma schedules for SD1.5, SDXL and SVD, "
        "log-linearly interpolated for other step counts. Every RewardLab node with a scheduler widget offers "
        "them as 'align_your_steps' (the family comes from the model).\n\nHere Noise Search samples 4 candidates "
        "with the SD1.5 schedule in 10 steps and keeps the one with the best reward. Pick your checkpoint and "
        "reward."))
    ckpt, pos, neg, latent, text = txt2img(g, "a hot air balloon over a lavender field, photo", share_prompt=True)
    reward = g.add("RewardLabLoadReward", model_name="aesthetic-v2")
    search = g.add("RewardLabNoiseSearch", model=ckpt[0], positive=pos[0], negative=neg[0], vae=ckpt[2],
                   latent=latent[0], reward=reward[0], steps=10, sampler="euler", scheduler="align_your_steps",
                   cfg=7.0, seed=0, batch=1, method="random", budget=40, prompt=text)
    g.add("SaveImage", images=search[2], filename_prefix="rewardlab/align_your_steps")
    g.add("PreviewAny", "Best score", source=search[4])
    g.group("Noise search on the AYS schedule", reward, search)
    return g


def draft_trainer(g, ckpt, reward, name, prompts, options=None):
    """DRaFT Train LoRA with the literature defaults (DRaFT-K, K=1, rank 8, lr 4e-4), each training prompt encoded
    by the checkpoint's CLIP; saves output/loras/<name>.safetensors. ``options``: a DRaFT Options node."""
    extra = {"options": options[0]} if options is not None else {}
    return g.add("RewardLabDRaFTTrainLoRA", model=ckpt[0], vae=ckpt[2], reward=reward, clip=ckpt[1],
                 prompts=prompts, sampler="euler", scheduler="normal", steps=20, cfg=7.5, width=512, height=512,
                 batch_size=4, method="DRaFT-K", k=1, learning_rate=4e-4, rank=8, training_steps=100,
                 save_every=50, name=name, seed=0, **extra)


def draft_options(g, heldout):
    """DRaFT Options with held-out prompts scored every 25 steps (the reward-hacking monitor) and early stopping
    after 2 scores without improvement; the rest at the defaults."""
    return g.add("RewardLabDRaFTOptions", heldout_prompts=heldout, heldout_every=25, early_stop_patience=2)


def sample_and_save(g, model, pos, neg, latent, vae, prefix, title=None):
    """Stock KSampler -> VAEDecode -> SaveImage; returns those three nodes."""
    sampler, decode = sample_and_decode(g, model, pos, neg, latent, vae, title, cfg=7.5)
    return [sampler, decode, g.add("SaveImage", images=decode[0], filename_prefix=prefix)]


@workflow("Train a reward LoRA (DRaFT)")
def draft_train_lora():
    g = Graph("draft_train_lora", draft_train_lora.title, note=(
        "DRaFT: train a reward LoRA by backpropagating a differentiable reward through sampling, then use it.\n\n"
        "1. Pick your SD1.5 checkpoint. The reward here is weight-free (colourfulness); swap in Load Reward Model "
        "for a learned one. Training prompts: one per line. DRaFT Options holds the advanced settings: here "
        "held-out prompts, scored every 25 steps, stop training when they stop improving.\n"
        "2. Queue: the LoRA is saved as output/loras/rewardlab_draft.safetensors every 50 steps; the trained MODEL "
        "goes straight into a KSampler, and Apply Reward LoRA uses the same LoRA at half strength (less reward, "
        "closer to the base model). The curve shows reward and loss per step.\n"
        "3. Later runs without retraining: mute DRaFT Train LoRA and unmute the group 'After training' (select it, "
        "Ctrl+M). It ships muted because the stock LoRA loader only accepts files that exist: before the first "
        "training that branch would fail validation (ComfyUI skips it and reports an error)."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a bouquet of wildflowers in a glass vase, photo")
    reward = g.add("RewardLabWeightFreeReward", kind="colourfulness")
    options = draft_options(g, "a lighthouse on a cliff at dusk\na plate of pasta on a wooden table")
    train = draft_trainer(g, ckpt, reward[0], "rewardlab_draft",
                          "a bouquet of wildflowers in a glass vase, photo\na street market at dusk\n"
                          "a portrait of an old fisherman\na bowl of fruit on a table", options)
    g.add("PreviewImage", "Reward curve", images=train[2])
    g.add("PreviewImage", "Last training batch", images=train[3])
    sample_and_save(g, train[0], pos, neg, latent, ckpt[2], "rewardlab/draft", "KSampler (trained model)")
    half = g.add("RewardLabApplyRewardLoRA", "Apply Reward LoRA (half strength)", model=ckpt[0], lora=train[1],
                 strength=0.5)
    sample_and_save(g, half[0], pos, neg, latent, ckpt[2], "rewardlab/draft_half", "KSampler (LoRA at 0.5)")
    from_file = g.add("LoraLoaderModelOnly", "Load the saved LoRA", model=ckpt[0],
                      lora_name="rewardlab_draft.safetensors", strength_model=1.0)
    after = [from_file] + sample_and_save(g, from_file[0], pos, neg, latent, ckpt[2], "rewardlab/draft_from_file",
                                          "KSampler (LoRA from file)")
    g.mute(*after)
    g.group("DRaFT training", reward, options, train)
    g.group("After training: the saved LoRA via the stock loader (muted)", *after)
    return g


@workflow("Mix and scale reward LoRAs")
def mix_reward_loras():
    g = Graph("mix_reward_loras", mix_reward_loras.title, note=(
        "Mix two reward LoRAs: alpha_1 * dW1 + alpha_2 * dW2 on one MODEL (DRaFT's LoRA mixing).\n\n"
        "Two DRaFT Train LoRA nodes make the LoRAs (weight-free rewards: colourfulness and JPEG compressibility; "
        "swap in Load Reward Model for learned ones; one DRaFT Options node sets both), Mix Reward LoRAs merges "
        "them onto the checkpoint's MODEL, "
        "and Save Reward LoRA writes the mix to output/loras/rewardlab_mix.safetensors. Try alpha in [0, 1] to "
        "interpolate, > 1 to extrapolate, < 0 to move away. LoRAs already on disk: chain two stock "
        "LoraLoaderModelOnly nodes with strengths alpha_1 and alpha_2 instead (the same sum of dW)."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a cottage garden in summer, photo")
    prompts = "a cottage garden in summer, photo\na city skyline at night\na cat sleeping on a sofa"
    colourful = g.add("RewardLabWeightFreeReward", "Reward 1: colourfulness", kind="colourfulness")
    compressible = g.add("RewardLabWeightFreeReward", "Reward 2: JPEG compressibility", kind="jpeg-compressibility")
    options = draft_options(g, "a mountain lake at noon\na red bicycle against a wall")
    lora_1 = draft_trainer(g, ckpt, colourful[0], "rewardlab_colourful", prompts, options)
    lora_2 = draft_trainer(g, ckpt, compressible[0], "rewardlab_compressible", prompts, options)
    mix = g.add("RewardLabMixRewardLoRAs", model=ckpt[0], lora_1=lora_1[1], alpha_1=1.0, lora_2=lora_2[1],
                alpha_2=0.5)
    g.add("RewardLabSaveRewardLoRA", lora=mix[1], name="rewardlab_mix")
    sample_and_save(g, mix[0], pos, neg, latent, ckpt[2], "rewardlab/mix")
    g.group("Reward LoRAs", colourful, compressible, options, lora_1, lora_2, mix)
    return g


# --- writing -----------------------------------------------------------------------------------------------------

def render(info=None):
    """{relative path: JSON text} of every workflow in both formats."""
    info = info or offline_object_info()
    files = {}
    for name, build in WORKFLOWS.items():
        g = build()
        files[editor_path(name)] = _dump(g.editor(info))
        files[api_path(name)] = _dump(g.api(info))
    return files


def editor_path(name):
    """example_workflows/<title>.json: the template browser shows the file name as title and description."""
    return os.path.join("example_workflows", f"{WORKFLOWS[name].title}.json")


def api_path(name):
    return os.path.join("workflows", "api", f"{name}.json")


def _dump(data):
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for rel, text in render().items():
        path = os.path.join(ROOT, rel)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current == text:
            continue
        stale.append(rel)
        if "--check" not in argv:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    verb = "out of date" if "--check" in argv else "written"
    print("\n".join(f"{verb}: {rel}" for rel in stale) or "all workflows up to date")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main())
