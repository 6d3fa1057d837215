"""A small reproduction of the DRaFT paper's method comparison (Clark et al. 2023, arXiv 2309.17400, §5) on the
embedded tiny model: training reward and held-out reward against the training step for DRaFT-1, DRaFT-K,
DRaFT-LV, full DRaFT, ReFL, AlignProp and DRTune, over several seeds. A benchmark, not a test: it prints one
JSON line per run and writes draft_paper.json and draft_paper.png into --out (default rewardlab_out/bench).

    python bench/draft_paper.py                          # the full comparison (see README for the measured time)
    python bench/draft_paper.py --steps 4 --seeds 0 --methods draft_k draft_lv --no-diagnostics   # a smoke run

Every method trains a LoRA of the same rank with the same optimiser, batch, schedule (6 Euler steps, CFG 3) and
reward (weight-free colourfulness) from the same seeds, so only the gradient estimator differs. Held-out reward and
caption accuracy (tiny/data.py: does the image still show its caption?) are scored every --eval-every steps on the
six held-out captions of `rewardlab train`, twice each, with fixed noise.

The DRaFT-LV diagnostics (on by default) look at why LV's advantage may not show: (1) LV with the mean over its
copies (the pack's behaviour before the paper's sum) next to LV with the sum, and how often gradient clipping bites
for each; (2) at the initial LoRA, the share of LV's gradient variance that comes from the re-noising noise (what
LV's n copies average away) against the variance between trajectories (prompts and x_T, which they do not touch).
"""
import argparse
import json
import os
import sys
import time

import torch

from rewardlab.plots import line_plot, save_image, stack_images
from rewardlab.rewards import load_reward
from rewardlab.tiny.data import caption_accuracy
from rewardlab.training.bundle import tiny_bundle
from rewardlab.training.cli import TINY_HELDOUT, TINY_PROMPTS
from rewardlab.training.draft import DraftConfig, Trainer

# Label -> DraftConfig fields of the method. K = 2 for DRaFT-K and DRTune (of 6 steps); AlignProp draws K over the
# whole chain (its default); ReFL draws m from the last quarter (its default: steps 5..5 of 6, i.e. the last step's
# input is the only choice at 6 steps, so it is widened to the last half here).
METHODS = {
    "DRaFT-1": dict(method="draft_k", k=1),
    "DRaFT-K (K=2)": dict(method="draft_k", k=2),
    "DRaFT-LV (n=2)": dict(method="draft_lv", lv_n=2),
    "DRaFT (full)": dict(method="draft"),
    "ReFL": dict(method="refl", refl_first=3, refl_last=5),
    "AlignProp": dict(method="alignprop"),
    "DRTune (K=2)": dict(method="drtune", k=2),
}
SHARED = dict(steps=6, scheduler="simple", cfg=3.0, batch_size=4, lr=2e-3, rank=4, targets=None, save_every=0)


def emit(**kw):
    print(json.dumps(kw), flush=True)


def evaluate(trainer, seed):
    prompts = TINY_HELDOUT * 2
    images, rewards = trainer.sample_images(prompts, seed=seed)
    return float(rewards.mean()), caption_accuracy(images, prompts)


def train_one(label, fields, seed, steps, eval_every, reward, eval_seed=1234):
    config = DraftConfig(**SHARED, **fields, train_steps=steps, seed=seed)
    trainer = Trainer(tiny_bundle(), reward, config, prompts=TINY_PROMPTS)
    held, acc = evaluate(trainer, eval_seed)
    curve = {"step": [0], "heldout_reward": [held], "caption_accuracy": [acc]}
    seconds = 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        trainer.log.append(trainer.train_step())
        seconds += time.perf_counter() - t0                    # training only, not the held-out scoring
        if step % eval_every == 0 or step == steps:
            held, acc = evaluate(trainer, eval_seed)
            curve["step"].append(step)
            curve["heldout_reward"].append(held)
            curve["caption_accuracy"].append(acc)
    record = {"method": label, "seed": seed, "train_seconds": seconds,
              "reward": [r["reward"] for r in trainer.log], "grad_norm": [r["grad_norm"] for r in trainer.log],
              **curve}
    emit(what="run", method=label, seed=seed, final_heldout=curve["heldout_reward"][-1],
         final_caption_accuracy=curve["caption_accuracy"][-1], seconds=round(seconds, 1))
    return record


def lv_variance(reward, seeds=(0, 1, 2, 3, 4, 5), copies=4):
    """At the initial LoRA: the LoRA gradient of one DRaFT-LV copy for several trajectories (prompts, x_T) × several
    re-noising draws. Returns the within-trajectory (re-noising) and between-trajectory variance, summed over
    parameters, and what averaging n = 2 copies leaves of the total."""
    config = DraftConfig(**SHARED, method="draft_lv", lv_n=1, train_steps=1, seed=0)
    trainer = Trainer(tiny_bundle(), reward, config, prompts=TINY_PROMPTS)
    with torch.no_grad():                                   # LoRA up-weights start at 0: give them a little size
        g = torch.Generator().manual_seed(0)
        for a in trainer.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.01)
    grads = []                                               # (trajectories, copies, params)
    for s in seeds:
        plan = trainer.plan(s)
        rows = []
        for c in range(copies):
            plan.lv_noise = [torch.randn(plan.noise.shape, generator=torch.Generator().manual_seed(1000 * s + c))]
            loss, _ = trainer.loss(plan)
            rows.append(torch.cat([p.flatten() for p in torch.autograd.grad(loss, trainer.params)]))
        grads.append(torch.stack(rows))
    grads = torch.stack(grads).double()
    within = grads.var(1).mean(0).sum().item()             # re-noising noise, same trajectory
    between = grads.mean(1).var(0).sum().item()            # trajectories
    total = within + between
    return {"within_renoise_var": within, "between_trajectory_var": between, "renoise_share": within / total,
            "variance_left_with_n2": (within / 2 + between) / total}


def plot(records, out_png, steps):
    by_method = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)

    def mean_curve(runs, key):
        n = min(len(r[key]) for r in runs)
        return [sum(r[key][i] for r in runs) / len(runs) for i in range(n)]

    def smooth(values, k=5):
        return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]
    train = {m: smooth(mean_curve(runs, "reward")) for m, runs in by_method.items()}
    held = {m: mean_curve(runs, "heldout_reward") for m, runs in by_method.items()}
    acc = {m: mean_curve(runs, "caption_accuracy") for m, runs in by_method.items()}
    eval_steps = next(iter(by_method.values()))[0]["step"]
    seeds = len(next(iter(by_method.values())))
    panels = [line_plot(train, title=f"training reward (mean of {seeds} seeds, 5-step moving average)",
                        xlabel="training step", x=list(range(1, steps + 1)), size=(760, 360)),
              line_plot(held, title="held-out reward (6 held-out captions x 2 noises)", xlabel="training step",
                        x=eval_steps, size=(760, 360)),
              line_plot(acc, title="held-out caption accuracy (shape and colours still match the caption)",
                        xlabel="training step", x=eval_steps, size=(760, 360))]
    save_image(stack_images(panels), out_png)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("rewardlab_out", "bench"), help="output folder (created)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=10, help="held-out scoring interval")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help="method labels or names (default: all seven)")
    p.add_argument("--reward", default="colourfulness")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-diagnostics", action="store_true", help="skip the DRaFT-LV diagnostics")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = {k: v for k, v in METHODS.items()
               if args.methods is None or k in args.methods or v["method"] in args.methods}
    if not methods:
        sys.exit(f"no method matches {args.methods}; choose from {list(METHODS)}")
    reward = load_reward(args.reward)
    t0 = time.perf_counter()
    records = [train_one(label, fields, seed, args.steps, args.eval_every, reward)
               for seed in args.seeds for label, fields in methods.items()]
    result = {"settings": dict(SHARED, targets="all", train_steps=args.steps, reward=args.reward, seeds=args.seeds,
                               methods={k: v for k, v in methods.items()}), "runs": records}
    if not args.no_diagnostics:
        mean_runs = [train_one("DRaFT-LV (n=2, mean)", dict(method="draft_lv", lv_n=2, lv_reduction="mean"), seed,
                               args.steps, args.eval_every, reward) for seed in args.seeds]
        result["runs"] += mean_runs
        clip = {}
        for r in result["runs"]:
            if r["method"].startswith("DRaFT-LV"):
                clip.setdefault(r["method"], []).append(sum(g > 1.0 for g in r["grad_norm"]) / len(r["grad_norm"]))
        result["lv_diagnostics"] = {"clipped_step_fraction": {k: sum(v) / len(v) for k, v in clip.items()},
                                    "gradient_variance": lv_variance(reward)}
        emit(what="lv_diagnostics", **result["lv_diagnostics"])
    summary = {}
    for r in result["runs"]:
        s = summary.setdefault(r["method"], {"final_heldout": [], "final_caption_accuracy": [], "train_seconds": [],
                                             "final_train_reward_last10": []})
        s["final_heldout"].append(r["heldout_reward"][-1])
        s["final_caption_accuracy"].append(r["caption_accuracy"][-1])
        s["train_seconds"].append(r["train_seconds"])
        s["final_train_reward_last10"].append(sum(r["reward"][-10:]) / len(r["reward"][-10:]))
    result["summary"] = {m: {k: sum(v) / len(v) for k, v in s.items()} | {"heldout_per_seed": s["final_heldout"]}
                         for m, s in summary.items()}
    result["initial_heldout"] = records[0]["heldout_reward"][0]
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "draft_paper.json"), os.path.join(args.out, "draft_paper.png")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    plot([r for r in result["runs"]], png_path, args.steps)
    emit(what="summary", seconds=round(result["seconds"]), json=json_path, png=png_path,
         **{m: {k: round(v, 4) for k, v in s.items() if not isinstance(v, list)} for m, s in result["summary"].items()})
    return result


if __name__ == "__main__":
    main()
