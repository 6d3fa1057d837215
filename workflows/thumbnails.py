"""Write a thumbnail for every shipped workflow: ``example_workflows/<title>.jpg``, the picture ComfyUI's template
browser shows beside a pack's template.

Each picture shows what its workflow does, made with RewardLab's own core on the built-in tiny model (32x32
coloured shapes, no downloads) and weight-free rewards, or plotted from the guidance schedules:

    python workflows/thumbnails.py            # all (about two minutes on two CPU cores)
    python workflows/thumbnails.py cads       # some

Deterministic (fixed seeds), so a rerun writes the same pictures.
"""
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(ROOT))

from rewardlab.plots import heat_colours, line_plot  # noqa: E402
from rewardlab.rewards.ensemble import RewardEnsemble  # noqa: E402
from rewardlab.rewards.simple import build as build_simple  # noqa: E402
from rewardlab.samplers import guidance as g  # noqa: E402
from rewardlab.samplers import noise_scaling, sigma_schedule  # noqa: E402

SIZE = (480, 360)
BACKGROUND = (30, 30, 34)
INK = (235, 235, 235)
BEST = (90, 220, 120)
PROMPT = "a red circle on a blue background"
THUMBNAILS = {}


def thumbnail(fn):
    THUMBNAILS[fn.__name__] = fn
    return fn


# --- drawing ----------------------------------------------------------------------------------------------------

def to_pil(image, size):
    """(3, H, W) in [0, 1] -> a PIL image scaled up with crisp pixels."""
    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def canvas():
    return Image.new("RGB", SIZE, BACKGROUND)


def tiles(images, columns, top=34, labels=None, best=None, gap=8):
    """A canvas with the images in a centred grid, optional labels under them and a frame around ``best``."""
    img = canvas()
    d = ImageDraw.Draw(img)
    rows = (len(images) + columns - 1) // columns
    label_h = 14 if labels else 0
    side = min((SIZE[0] - gap * (columns + 1)) // columns, (SIZE[1] - top - gap * (rows + 1)) // rows - label_h)
    left = (SIZE[0] - columns * side - (columns - 1) * gap) // 2
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        x, y = left + c * (side + gap), top + gap + r * (side + gap + label_h)
        img.paste(to_pil(image, side), (x, y))
        if best is not None and i == best:
            d.rectangle([x - 3, y - 3, x + side + 2, y + side + 2], outline=BEST, width=3)
        if labels:
            d.text((x + 2, y + side + 1), labels[i], fill=BEST if i == best else INK)
    return img


def caption(img, text, y=10):
    ImageDraw.Draw(img).text((12, y), text, fill=INK)
    return img


def plot(series, title, xlabel, x=None, markers=None, ylabel="cfg"):
    """A line plot (plots.line_plot) as a thumbnail-sized PIL image."""
    arr = line_plot(series, title=title, xlabel=xlabel, ylabel=ylabel, x=x, markers=markers, size=SIZE)[0]
    return Image.fromarray((arr.numpy() * 255).round().astype(np.uint8))


def side_by_side(left, right, left_label, right_label, title):
    img = canvas()
    side = 200
    for k, (image, label) in enumerate(((left, left_label), (right, right_label))):
        x = 26 + k * (side + 28)
        img.paste(to_pil(image, side), (x, 60))
        ImageDraw.Draw(img).text((x, 268), label, fill=BEST if k else INK)
    return caption(img, title)


# --- the tiny model ---------------------------------------------------------------------------------------------

_TINY = {}


def tiny():
    if "model" not in _TINY:
        from rewardlab.tiny.model import load_tiny
        _TINY["model"] = load_tiny()
    return _TINY["model"]


def red_reward():
    """Weight-free: how red the shape is, plus saturation."""
    red = build_simple("red", {"kind": "target_colour", "colour": (1.0, 0.0, 0.0)})
    sat = build_simple("saturation", {"kind": "saturation"})
    return RewardEnsemble([red, sat], [1.0, 0.5])


def samples(prompt, seeds, cfg=3.0, steps=12):
    return torch.cat([tiny().generate([prompt], steps=steps, cfg=cfg, seed=s) for s in seeds])


def chain(steps, step="euler", seed=0, cfg=3.0):
    from rewardlab.noise import Chain
    t = tiny()
    sigmas = sigma_schedule("karras", steps, t.model_sigmas.cpu())
    return Chain(t.guided([PROMPT], cfg=cfg), sigmas, decode=t.decode, step=step, seed=seed, channels=3)


def guided_sample(prompt, seed, cfg, steps=12, **spec):
    t = tiny()
    sigmas = sigma_schedule("karras", steps, t.model_sigmas.cpu())
    guided = g.GuidedDenoiser(t.denoiser, t.encode([prompt]), t.encode([""]), scale=cfg, **spec)
    out, _ = guided.sample(noise_scaling(sigmas[0], t.initial_noise(1, seed)), sigmas,
                           generator=torch.Generator().manual_seed(seed + 1))
    return t.decode(out.x)


def run_info(steps=20):
    return g.RunInfo(sigma_schedule("karras", steps, tiny().model_sigmas.cpu()), "eps")


# --- one thumbnail per workflow ---------------------------------------------------------------------------------

@thumbnail
def score_and_rank():
    images = samples(PROMPT, range(8))
    scores = red_reward()(images, [PROMPT] * 8)
    order = torch.argsort(scores, descending=True).tolist()
    labels = [f"#{k + 1}  {scores[i]:.3f}" for k, i in enumerate(order)]
    return caption(tiles(images[order], 4, labels=labels, best=0), "8 samples ranked by a reward, best first")


@thumbnail
def inspect_rewards():
    images = samples(PROMPT, range(4))
    x = images.clone().requires_grad_(True)
    red_reward()(x, [PROMPT] * 4).sum().backward()
    heat = x.grad.abs().sum(1, keepdim=True)
    heat = (heat / heat.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)) ** 0.5
    overlay = 0.4 * images + 0.6 * heat_colours(heat)
    return caption(tiles(torch.cat([images, overlay]), 4), "samples and where the reward's gradient points")


def yellow_reward():
    """Weight-free: how close the image is to yellow (the tiny model draws a red circle on blue for PROMPT, so
    optimising towards yellow shows)."""
    return build_simple("yellow", {"kind": "target_colour", "colour": (1.0, 1.0, 0.0)})


@thumbnail
def reno_noise():
    from rewardlab.noise import reno
    c, reward = chain(steps=2), yellow_reward()
    eps = tiny().initial_noise(1, seed=3)
    with torch.no_grad():
        before = c.images(c.run(eps).x)
    res = reno(c, reward, eps, iterations=16, lr=20.0)
    return side_by_side(before[0], res.images[0], f"seed's noise  {float(reward(before, [PROMPT])):.3f}",
                        f"optimised noise  {float(res.reward[0]):.3f}",
                        "ReNO: the starting noise optimised for a 'yellow' reward")


@thumbnail
def noise_search():
    from rewardlab.noise.search import noise_search as search
    c, reward = chain(steps=6), red_reward()
    t = tiny()
    candidates = [t.initial_noise(1, seed=s) for s in range(8)]
    with torch.no_grad():
        images = torch.cat([c.images(c.run(e).x) for e in candidates])
        scores = reward(images, [PROMPT] * len(candidates))
    res = search("random", c, reward, candidates[0], budget=8, seed=0)
    best = int(torch.argmax(scores))
    labels = [f"{s:.3f}" for s in scores.tolist()]
    img = tiles(images, 4, labels=labels, best=best)
    return caption(img, f"8 starting noises, the best kept (search best {float(res.reward[0]):.3f})")


@thumbnail
def scheduled_guidance_guider():
    run = run_info()
    series = {name: g.wang(name, 7.5, floor=2.0, power=1.0).values(run) for name in ("static", "linear", "cosine")}
    return plot(series, "Wang et al. schedules at mean cfg 7.5", "step")


@thumbnail
def guidance_schedule_toolkit():
    run = run_info()
    ramp = g.Cosine(3.0, 9.0, "p_step")
    keys = g.Keyframes.parse("0:9.0, 0.4:7.0, 1:3.0", "p_step", "linear")
    lower = g.Combine("min", ramp, keys)
    series = {"shape (cosine)": ramp.values(run), "keyframes": keys.values(run), "min": lower.values(run),
              "mean 7": g.NormalizeMean(lower, 7.0).values(run)}
    return plot(series, "shape, keyframes, min, rescaled to mean cfg 7", "step")


@thumbnail
def guidance_model_patch():
    run = run_info()
    sigmas = [c.sigma_edm for c in run.contexts()]
    interval = g.Interval(g.Constant(7.0), 0.28, 5.42, "sigma_edm", 1.0)
    return plot({"cfg": interval.values(run)}, "guidance interval: cfg 7 for sigma in [0.28, 5.42]", "sigma",
                x=sigmas, markers=[0.28, 5.42])


@thumbnail
def reward_guidance():
    reward = yellow_reward()

    def score(images):
        return reward(images, [PROMPT] * images.shape[0])

    plain = guided_sample(PROMPT, seed=5, cfg=3.0)
    steered = guided_sample(PROMPT, seed=5, cfg=3.0, reward=g.RewardGuidance(
        score, decode=tiny().decode, strength=3000.0, start=0.0, end=0.8))
    return side_by_side(plain[0], steered[0], f"CFG only  {float(score(plain)):.3f}",
                        f"+ reward guidance  {float(score(steered)):.3f}",
                        "the same seed, steered towards a 'yellow' reward")


@thumbnail
def cads():
    run = run_info()
    cads_ = g.CADS(tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0)
    gammas = [cads_.gamma(c) for c in run.contexts()]
    series = {"gamma (share of the condition)": gammas,
              "noise on the condition": [cads_.noise_scale * (1 - v) ** 0.5 for v in gammas]}
    return plot(series, "CADS: the condition is noised early, clean from tau1 on", "step", ylabel="weight")


@thumbnail
def perturbed_attention_guidance():
    run = run_info()
    scale = g.Linear(5.0, 1.0, "p_step")
    return plot({"PAG scale": scale.values(run), "cfg": [5.0] * run.n_steps},
                "PAG scale 5 -> 1 over the steps, on top of cfg 5", "step", ylabel="scale")


@thumbnail
def skip_layer_guidance():
    run = run_info(40)
    active = [2.8 if 0.01 <= c.p_step <= 0.2 else 0.0 for c in run.contexts()]
    return plot({"SLG scale (blocks 7, 8, 9 skipped)": active, "cfg": [4.5] * run.n_steps},
                "skip-layer guidance between 1 % and 20 % of the steps", "step", ylabel="scale")


@thumbnail
def linear_ag():
    run = run_info()
    gate = g.LinearAG()
    evaluated = [0.0 if gate.estimated(c) else 1.0 for c in run.contexts()]
    return plot({"negative prompt evaluated (1) or estimated (0)": evaluated},
                f"LinearAG: {evaluated.count(0.0)} of {len(evaluated)} negative evaluations estimated", "step",
                ylabel="")


@thumbnail
def align_your_steps():
    from rewardlab.samplers.sigmas import align_your_steps as ays
    model_sigmas = tiny().model_sigmas.cpu()
    series = {"Align Your Steps (SD1.5, 10 steps)": [float(v) for v in ays(10, "sd15")[:-1].log()],
              "karras (10 steps)": [float(v) for v in sigma_schedule("karras", 10, model_sigmas)[:-1].log()]}
    return plot(series, "log sigma per step: AYS spends its steps differently", "step", ylabel="log sigma")


_DRAFT = {}


def draft_demo():
    """The README demo (DRaFT on the tiny model, weight-free colourfulness), once."""
    if "summary" not in _DRAFT:
        from rewardlab.training.cli import demo_training
        _DRAFT["dir"] = tempfile.mkdtemp(prefix="rewardlab_thumbs_")
        _DRAFT["summary"] = demo_training(_DRAFT["dir"], train_steps=40, seed=0, log=lambda *a: None)
    return _DRAFT["summary"]


@thumbnail
def draft_train_lora():
    s = draft_demo()
    img = canvas()
    with Image.open(s["curve"]) as curve:
        img.paste(curve.convert("RGB").resize((SIZE[0], 180)), (0, 180))
    for k, (key, label) in enumerate((("before", "before"), ("after", "after training"))):
        with Image.open(s[key]) as grid:
            img.paste(grid.convert("RGB").resize((220, 110), Image.NEAREST), (12 + k * 236, 34))
        ImageDraw.Draw(img).text((12 + k * 236, 148), label, fill=BEST if k else INK)
    return caption(img, f"DRaFT on colourfulness: reward {s['reward_before']:.3f} -> {s['reward_after']:.3f}")


@thumbnail
def mix_reward_loras():
    from safetensors.torch import load_file

    from rewardlab.training.lora import apply_lora, remove_lora
    s = draft_demo()
    lora = load_file(s["lora"])
    t = tiny()
    rows, labels = [], []
    for alpha in (0.0, 0.5, 1.0, 1.5):
        adapters = apply_lora(t.unet, lora, scale=alpha)
        try:
            rows.append(t.generate(["a blue triangle on a green background"], steps=6, cfg=3.0, scheduler="simple",
                                   seed=2))
        finally:
            remove_lora(t.unet, adapters)
        labels.append(f"alpha {alpha:g}")
    return caption(tiles(torch.cat(rows), 4, labels=labels, top=60),
                   "one reward LoRA at alpha 0, 0.5, 1, 1.5 (mixing adds alpha * dW)")


# --- writing ----------------------------------------------------------------------------------------------------

def workflow_titles():
    """{workflow name: title} from workflows/build.py (the editor files are named by title)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rewardlab_workflow_build", os.path.join(ROOT, "workflows",
                                                                                          "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return {name: fn.title for name, fn in build.WORKFLOWS.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(int(os.environ.get("REWARDLAB_THREADS", "2")))
    titles = workflow_titles()
    missing = sorted(set(titles) - set(THUMBNAILS))
    if missing:
        raise SystemExit(f"no thumbnail function for {missing}: add one to workflows/thumbnails.py")
    for name in argv or titles:
        if name not in THUMBNAILS:
            raise SystemExit(f"unknown workflow {name!r}; known: {', '.join(sorted(THUMBNAILS))}")
        torch.manual_seed(0)
        image = THUMBNAILS[name]()
        path = os.path.join(ROOT, "example_workflows", f"{titles[name]}.jpg")
        image.convert("RGB").save(path, quality=88)
        print(f"written: {os.path.relpath(path, ROOT)}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
