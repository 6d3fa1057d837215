"""Generate RewardLab's shipped workflows from one description each, in both formats:

- editor format (nodes + links, what the ComfyUI editor saves and loads) -> ``example_workflows/<name>.json``,
  the folder ComfyUI's template browser serves for custom packs (``app/custom_node_manager.py``);
- API format (what ``POST /prompt`` and ``rewardlab run`` take) -> ``workflows/api/<name>.json``.

    python workflows/build.py            # (re)write every workflow
    python workflows/build.py --check    # exit 1 if a shipped file differs from what would be written

Node specs (widget order, defaults, socket types) come from our NODE_CLASS_MAPPINGS and the stock table
(rewardlab.batch.stock_nodes), so the files follow the nodes when their inputs change: rerun this script.
"""
import json
import os
import sys

from rewardlab.batch.convert import default_value, input_specs, is_widget, widget_slots
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


class Graph:
    def __init__(self, name, note=""):
        self.name, self.note = name, note
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
        positions = self._layout()
        nodes = [self._note_node(positions)] if self.note else []
        for order, node in enumerate(self.nodes):
            nodes.append(self._editor_node(node, info, order, positions[node.id], links, incoming, outgoing))
        for prim in self.primitives:
            nodes.append(self._primitive_node(prim, info, positions[prim.id], outgoing))
        groups = [self._group(title, members, positions) for title, members in self.groups]
        last_id = max([n["id"] for n in nodes] + [0])
        return {"last_node_id": last_id, "last_link_id": len(links), "nodes": nodes, "links": links,
                "groups": groups, "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}

    def _editor_node(self, node, info, order, pos, links, incoming, outgoing):
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
        outputs = [{"name": spec["output_name"][i], "type": t, "links": outgoing.get((node.id, i), []),
                    "slot_index": i} for i, t in enumerate(spec["output"])]
        values = self.values(node, info)
        widgets = [values[name] if name else _ui_widget_value(kind) for name, kind, _ in widget_slots(spec)]
        out = {"id": node.id, "type": node.class_type, "pos": pos, "size": _size(len(widgets), inputs, outputs),
               "flags": {}, "order": order, "mode": node.mode, "inputs": inputs, "outputs": outputs,
               "properties": {"Node name for S&R": node.class_type}, "widgets_values": widgets}
        if node.title and node.title != spec.get("display_name"):
            out["title"] = node.title
        return out

    def _primitive_node(self, prim, info, pos, outgoing):
        node, name = prim.targets[0]
        typ, opts = next((t, o) for n, t, o in input_specs(info[node.class_type]) if n == name)
        slots = [s for s in widget_slots(info[node.class_type])]
        has_control = any(s[0] is None and slots[i - 1][0] == name for i, s in enumerate(slots) if i)
        kind = "COMBO" if isinstance(typ, list) else typ
        return {"id": prim.id, "type": "PrimitiveNode", "pos": pos, "size": [400, 160 if kind == "STRING" else 82],
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [],
                "outputs": [{"name": kind, "type": kind, "links": outgoing.get((prim.id, 0), []),
                             "slot_index": 0, "widget": {"name": name}}],
                "title": prim.title, "properties": {"Run widget replace on values": False},
                "widgets_values": [prim.value] + (["fixed"] if has_control else [])}

    def _note_node(self, positions):
        return {"id": len(self.nodes) + len(self.primitives) + 1, "type": "Note", "pos": [40, -260],
                "size": [520, 200], "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                "title": "How to use", "properties": {"text": ""}, "widgets_values": [self.note],
                "color": "#432", "bgcolor": "#653"}

    def _layout(self):
        """Columns by dependency depth (sources sit just left of their first consumer), rows in insertion
        order, in horizontal bands (see below); primitives sit in the first column."""
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
        # Bands: ungrouped nodes on top, then one band per group, so a group's box holds only its members.
        band_of = {}
        for index, (_, members) in enumerate(self.groups, 1):
            for m in members:
                band_of.setdefault(m.id, index)
        pos, top = {}, 40
        for band in range(len(self.groups) + 1):
            rows = {}
            if band == 0 and self.primitives:
                rows[0] = len(self.primitives)
                for k, prim in enumerate(self.primitives):
                    pos[prim.id] = [40, top + 260 * k]
            for node in self.nodes:
                if band_of.get(node.id, 0) == band:
                    col = depth[node.id]
                    pos[node.id] = [40 + 400 * col, top + 260 * rows.get(col, 0)]
                    rows[col] = rows.get(col, 0) + 1
            top += 260 * max(rows.values(), default=0) + (80 if rows else 0)
        return pos

    @staticmethod
    def _group(title, members, positions):
        xs = [positions[m.id][0] for m in members]
        ys = [positions[m.id][1] for m in members]
        return {"title": title, "bounding": [min(xs) - 20, min(ys) - 50, max(xs) - min(xs) + 380,
                                             max(ys) - min(ys) + 290],
                "color": "#3f789e", "font_size": 24, "flags": {}}


def _ui_widget_value(kind):
    return {"control_after_generate": "fixed", "control_filter_list": "", "upload": "image"}[kind]


def _size(n_widgets, inputs, outputs):
    return [340, 46 + 24 * (max(len(inputs), len(outputs)) + n_widgets)]


# --- the workflows -----------------------------------------------------------------------------------------------

WORKFLOWS = {}


def workflow(fn):
    WORKFLOWS[fn.__name__] = fn
    return fn


def txt2img(g, prompt, negative="blurry, low quality, watermark", batch_size=1, share_prompt=False):
    """Checkpoint, prompts and an empty latent: (loader, positive, negative, latent, prompt). With
    ``share_prompt`` the prompt is a PrimitiveNode, to feed the same text to a reward node too."""
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    text = g.primitive("Prompt", prompt) if share_prompt else prompt
    pos = g.add("CLIPTextEncode", "Positive", text=text, clip=ckpt[1])
    neg = g.add("CLIPTextEncode", "Negative", text=negative, clip=ckpt[1])
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=batch_size)
    return ckpt, pos, neg, latent, text


@workflow
def score_and_rank():
    g = Graph("score_and_rank", note=(
        "Score and rank a batch with a reward model.\n\n1. Pick your SD1.5 checkpoint in Load Checkpoint.\n"
        "2. Put the reward weights in models/rewards (see the README) and pick the reward in Load Reward Model.\n"
        "3. Queue: KSampler makes 4 candidates, Rank Images keeps the best, the table shows every score.\n\n"
        "Batch runs: rewardlab run workflows/api/score_and_rank.json --server http://127.0.0.1:8188 "
        "--set KSampler.seed=1..8"))
    ckpt, pos, neg, latent, text = txt2img(g, "a photo of a red fox in the snow, golden hour", batch_size=4,
                                           share_prompt=True)
    sampler = g.add("KSampler", model=ckpt[0], positive=pos[0], negative=neg[0], latent_image=latent[0], seed=0,
                    steps=20, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    decode = g.add("VAEDecode", samples=sampler[0], vae=ckpt[2])
    reward = g.add("RewardLabLoadReward", model_name="aesthetic-v2")
    rank = g.add("RewardLabRankImages", reward=reward[0], images=decode[0], prompts=text, top_k=1,
                 order="best first", latent=sampler[0])
    g.add("SaveImage", "Save best", images=rank[0], filename_prefix="rewardlab/best")
    g.add("PreviewImage", "All candidates", images=decode[0])
    g.add("PreviewAny", "Scores", source=rank[3])
    g.group("Score and rank", reward, rank)
    return g


def custom_sampling(g, model, guider, latent, vae, prefix, steps=20, seed=0):
    """RandomNoise + KSamplerSelect + BasicScheduler into SamplerCustomAdvanced, decoded and saved.
    Returns (sigmas node, sampler node)."""
    noise = g.add("RandomNoise", noise_seed=seed)
    select = g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=model, scheduler="karras", steps=steps, denoise=1.0)
    sample = g.add("SamplerCustomAdvanced", noise=noise[0], guider=guider, sampler=select[0], sigmas=sigmas[0],
                   latent_image=latent)
    decode = g.add("VAEDecode", samples=sample[0], vae=vae)
    g.add("SaveImage", images=decode[0], filename_prefix=prefix)
    return sigmas, sample


def resample(g, ckpt, pos, neg, latent, noise, cfg, steps, scheduler, prefix):
    """Stock SamplerCustomAdvanced fed with an optimised NOISE: same model, conds, cfg, sampler and sigmas as the
    optimiser, so it reproduces the optimised image."""
    guider = g.add("CFGGuider", model=ckpt[0], positive=pos[0], negative=neg[0], cfg=cfg)
    select = g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=ckpt[0], scheduler=scheduler, steps=steps, denoise=1.0)
    sample = g.add("SamplerCustomAdvanced", noise=noise, guider=guider[0], sampler=select[0], sigmas=sigmas[0],
                   latent_image=latent[0])
    decode = g.add("VAEDecode", samples=sample[0], vae=ckpt[2])
    g.add("SaveImage", images=decode[0], filename_prefix=prefix)
    return sample


@workflow
def reno_noise():
    g = Graph("reno_noise", note=(
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


@workflow
def noise_search():
    g = Graph("noise_search", note=(
        "Noise search: try many initial noises (random, zero-order neighbourhood or search over paths), keep the "
        "one with the best reward, and sample it with stock SamplerCustomAdvanced.\n\nNo gradients, so any "
        "model and any reward works; the cost is `budget` full samplings. Pick your checkpoint and reward."))
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
    g.group("Noise search", reward, search)
    return g


@workflow
def scheduled_guidance_guider():
    g = Graph("scheduled_guidance_guider", note=(
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


@workflow
def guidance_model_patch():
    g = Graph("guidance_model_patch", note=(
        "The same guidance schedules as a MODEL patch, so the stock KSampler uses them.\n\n"
        "Guidance Interval applies CFG 7 only for sigmas in [0.28, 5.42] (Kynkaanniemi et al.) and 1 outside; "
        "Apply Guidance Schedule patches the model's CFG function. KSampler's cfg must stay above 1 (at 1 it "
        "skips the unconditional pass). Pick your SD1.5 checkpoint in Load Checkpoint."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a cozy cabin in a snowy forest at night, warm light")
    schedule = g.add("RewardLabGuidanceInterval", cfg=7.0, low=0.28, high=5.42, axis="sigma_edm", outside=1.0)
    patched = g.add("RewardLabApplyGuidanceSchedule", model=ckpt[0], combiner="cfg", cfg_schedule=schedule[0])
    sampler = g.add("KSampler", model=patched[0], positive=pos[0], negative=neg[0], latent_image=latent[0], seed=0,
                    steps=20, cfg=7.0, sampler_name="euler", scheduler="karras", denoise=1.0)
    decode = g.add("VAEDecode", samples=sampler[0], vae=ckpt[2])
    g.add("SaveImage", images=decode[0], filename_prefix="rewardlab/guidance_patch")
    g.group("Guidance as a model patch", schedule, patched)
    return g


@workflow
def reward_guidance():
    g = Graph("reward_guidance", note=(
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


@workflow
def cads():
    g = Graph("cads", note=(
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


@workflow
def perturbed_attention_guidance():
    g = Graph("perturbed_attention_guidance", note=(
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


@workflow
def skip_layer_guidance():
    g = Graph("skip_layer_guidance", note=(
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


@workflow
def linear_ag():
    g = Graph("linear_ag", note=(
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


@workflow
def align_your_steps():
    g = Graph("align_your_steps", note=(
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


def draft_trainer(g, ckpt, reward, name, prompts):
    """DRaFT Train LoRA with the literature defaults (DRaFT-K, K=1, rank 8, lr 4e-4), each training prompt encoded
    by the checkpoint's CLIP; saves output/loras/<name>.safetensors."""
    return g.add("RewardLabDRaFTTrainLoRA", model=ckpt[0], vae=ckpt[2], reward=reward, clip=ckpt[1],
                 prompts=prompts, sampler="euler", scheduler="normal", steps=20, cfg=7.5, width=512, height=512,
                 batch_size=4, method="DRaFT-K", k=1, learning_rate=4e-4, rank=8, training_steps=100,
                 save_every=50, name=name, seed=0)


def sample_and_save(g, model, pos, neg, latent, vae, prefix, title=None):
    """Stock KSampler -> VAEDecode -> SaveImage; returns those three nodes."""
    sampler = g.add("KSampler", title, model=model, positive=pos[0], negative=neg[0], latent_image=latent[0],
                    seed=0, steps=20, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    decode = g.add("VAEDecode", samples=sampler[0], vae=vae)
    return [sampler, decode, g.add("SaveImage", images=decode[0], filename_prefix=prefix)]


@workflow
def draft_train_lora():
    g = Graph("draft_train_lora", note=(
        "DRaFT: train a reward LoRA by backpropagating a differentiable reward through sampling, then use it.\n\n"
        "1. Pick your SD1.5 checkpoint. The reward here is weight-free (colourfulness); swap in Load Reward Model "
        "for a learned one. Training prompts: one per line.\n"
        "2. Queue: the LoRA is saved as output/loras/rewardlab_draft.safetensors every 50 steps; the trained MODEL "
        "goes straight into the KSampler on the right, and the curve shows reward and loss per step.\n"
        "3. Later runs without retraining: mute DRaFT Train LoRA and unmute the group 'After training' (select it, "
        "Ctrl+M). It ships muted because the stock LoRA loader only accepts files that exist: before the first "
        "training that branch would fail validation (ComfyUI skips it and reports an error)."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a bouquet of wildflowers in a glass vase, photo")
    reward = g.add("RewardLabWeightFreeReward", kind="colourfulness")
    train = draft_trainer(g, ckpt, reward[0], "rewardlab_draft",
                          "a bouquet of wildflowers in a glass vase, photo\na street market at dusk\n"
                          "a portrait of an old fisherman\na bowl of fruit on a table")
    g.add("PreviewImage", "Reward curve", images=train[2])
    g.add("PreviewImage", "Last training batch", images=train[3])
    sample_and_save(g, train[0], pos, neg, latent, ckpt[2], "rewardlab/draft", "KSampler (trained model)")
    from_file = g.add("LoraLoaderModelOnly", "Load the saved LoRA", model=ckpt[0],
                      lora_name="rewardlab_draft.safetensors", strength_model=1.0)
    after = [from_file] + sample_and_save(g, from_file[0], pos, neg, latent, ckpt[2], "rewardlab/draft_from_file",
                                          "KSampler (LoRA from file)")
    g.mute(*after)
    g.group("DRaFT training", reward, train)
    g.group("After training: the saved LoRA via the stock loader (muted)", *after)
    return g


@workflow
def mix_reward_loras():
    g = Graph("mix_reward_loras", note=(
        "Mix two reward LoRAs: alpha_1 * dW1 + alpha_2 * dW2 on one MODEL (DRaFT's LoRA mixing).\n\n"
        "Two DRaFT Train LoRA nodes make the LoRAs (weight-free rewards: colourfulness and JPEG compressibility; "
        "swap in Load Reward Model for learned ones), Mix Reward LoRAs merges them onto the checkpoint's MODEL, "
        "and Save Reward LoRA writes the mix to output/loras/rewardlab_mix.safetensors. Try alpha in [0, 1] to "
        "interpolate, > 1 to extrapolate, < 0 to move away. LoRAs already on disk: chain two stock "
        "LoraLoaderModelOnly nodes with strengths alpha_1 and alpha_2 instead (the same sum of dW)."))
    ckpt, pos, neg, latent, _ = txt2img(g, "a cottage garden in summer, photo")
    prompts = "a cottage garden in summer, photo\na city skyline at night\na cat sleeping on a sofa"
    colourful = g.add("RewardLabWeightFreeReward", "Reward 1: colourfulness", kind="colourfulness")
    compressible = g.add("RewardLabWeightFreeReward", "Reward 2: JPEG compressibility", kind="jpeg-compressibility")
    lora_1 = draft_trainer(g, ckpt, colourful[0], "rewardlab_colourful", prompts)
    lora_2 = draft_trainer(g, ckpt, compressible[0], "rewardlab_compressible", prompts)
    mix = g.add("RewardLabMixRewardLoRAs", model=ckpt[0], lora_1=lora_1[1], alpha_1=1.0, lora_2=lora_2[1],
                alpha_2=0.5)
    g.add("RewardLabSaveRewardLoRA", lora=mix[1], name="rewardlab_mix")
    sample_and_save(g, mix[0], pos, neg, latent, ckpt[2], "rewardlab/mix")
    g.group("Reward LoRAs", colourful, compressible, lora_1, lora_2, mix)
    return g


# --- writing -----------------------------------------------------------------------------------------------------

def render(info=None):
    """{relative path: JSON text} of every workflow in both formats."""
    info = info or offline_object_info()
    files = {}
    for name, build in WORKFLOWS.items():
        g = build()
        files[os.path.join("example_workflows", f"{name}.json")] = _dump(g.editor(info))
        files[os.path.join("workflows", "api", f"{name}.json")] = _dump(g.api(info))
    return files


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
