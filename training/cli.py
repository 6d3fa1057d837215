"""`rewardlab train` and the DRaFT part of `rewardlab demo`.

    rewardlab train --reward colourfulness --train-steps 200          # the embedded tiny model
    rewardlab train --model ./sd15-diffusers --reward hps-v2.1 --prompts prompts.txt --width 512 --height 512
    rewardlab train --model ./FLUX.1-dev --guidance 3.5 --steps 20 --width 1024 --height 1024 ...
    torchrun --nproc_per_node 4 "$(which rewardlab)" train --model ...   # data parallel (one process per GPU)

--model takes a diffusers pipeline folder: Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux, recognised by the
``_class_name`` in its model_index.json (training/pipelines.py). Steps, CFG and the schedule default to the
pipeline's own; Flux-dev-like models take the distilled --guidance and train without a CFG batch at --cfg 1.

Writes <out>/<name>.safetensors (LoRA keys ComfyUI's LoraLoader maps for the family), <name>_curve.png,
<name>_before.png, <name>_after.png, <name>_log.json, and the training state <out>/rewardlab_state/<name>.state.pt
(for --resume). An existing LoRA of that name is continued with --resume or replaced with --overwrite, never
silently. Under torchrun every rank trains on its own micro-batches with gradients averaged; only rank 0 prints,
writes and plots, and the logged reward and loss are the means over ranks. --resume under torchrun: every rank loads
the checkpoint rank 0 wrote.
"""
import argparse
import atexit
import json
import os
import time

import torch

from ..plots import labelled_panels, line_plot, save_image, save_png, stack_images, training_curve
from ..rewards.base import prompt_lines
from ..samplers.steps import STEPS
from . import checkpoints as ckpt
from .draft import DraftConfig, Trainer, TrainingStopped
from .options import add_cli_arguments, cli_values, config_from_options

TINY_PROMPTS = ["a red circle on a blue background", "a green square on a white background",
                "a yellow triangle on a black background", "a blue cross on a yellow background",
                "a white circle on a red background", "a black square on a green background"]
TINY_HELDOUT = ["a red triangle on a white background", "a green cross on a black background",
                "a blue square on a red background", "a yellow circle on a green background",
                "a white triangle on a blue background", "a black cross on a yellow background"]


def add_train_command(subparsers):
    """Register `train` on an argparse subparsers object (rewardlab/cli.py calls this)."""
    p = subparsers.add_parser("train", help="DRaFT-train a reward LoRA (tiny model, or a diffusers SD/SDXL/SD3/Flux "
                              "folder)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers pipeline folder: SD 1.x/2.x, SDXL, SD3 or Flux "
                   "(default: the embedded tiny model)")
    p.add_argument("--reward", default="colourfulness", help="reward name (rewardlab rewards list)")
    p.add_argument("--prompts", default=None, help="text file with one prompt per line (default: tiny captions)")
    p.add_argument("--heldout", default=None, help="text file of held-out prompts")
    p.add_argument("--sampler", default="euler", choices=list(STEPS), help="step function")
    p.add_argument("--scheduler", default=None, help="sigma schedule (default: leading for SD/SDXL, simple for tiny; "
                   "SD3/Flux use their pipeline's flow-matching schedule)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="distilled guidance of guidance-embedded models "
                   "(Flux-dev; default 3.5), given to the model instead of a CFG batch")
    add_cli_arguments(p)          # the DRaFT settings, from the table the node shares (training/options.py)
    p.set_defaults(steps=None, cfg=None)      # per model: the pipeline's defaults, 8 steps / cfg 3 for the tiny model
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--out", default="rewardlab_train", help="output folder")
    p.add_argument("--name", default="draft_lora", help="LoRA file name ('folder/name' for a subfolder of --out)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--resume", action="store_true", help="continue from <out>/<name>.safetensors")
    what.add_argument("--overwrite", action="store_true", help="replace an existing <out>/<name>.safetensors")
    p.set_defaults(func=run_train)
    return p


def _lines(path, default, flag):
    if path is None:
        return list(default)
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file (give a text file with one prompt per line)")
    with open(path, encoding="utf-8") as f:
        lines = prompt_lines(f.read())
    if not lines:
        raise ValueError(f"{flag} {path} holds no prompts: write one prompt per line")
    return lines


def output_files(out, name, resume=False, overwrite=False):
    """The checked RunFiles of <out>/<name>: a bad name, or an existing LoRA without --resume / --overwrite, is a
    ValueError here, before any model is loaded."""
    files = ckpt.run_files(name, root=out, lora_folder="", what="--name")
    if files.taken() and not (resume or overwrite):
        raise ValueError(f"{files.lora} already exists: pass --resume to continue it, --overwrite to replace it, "
                         f"or choose another --name")
    return files.prepare()


def _init_distributed(device):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    dist = torch.distributed
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        atexit.register(_destroy_process_group)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def _destroy_process_group():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _is_main():
    """Rank 0 of a torchrun job, or a plain process: the one that prints and writes files."""
    d = torch.distributed
    return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0


def _barrier():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        d.barrier()


TINY_DEFAULTS = {"steps": 8, "cfg": 3.0, "scheduler": "simple"}


def build(args):
    """(bundle, config, prompts, heldout) from parsed arguments; prompt files are read before the model is loaded."""
    from .bundle import tiny_bundle
    from .pipelines import diffusers_bundle

    tiny = args.model is None
    if tiny and args.guidance is not None:
        raise ValueError("--guidance applies to guidance-distilled diffusers models (Flux-dev); the tiny model uses --cfg")
    prompts = _lines(args.prompts, TINY_PROMPTS if tiny else ["a photo of a cat"], "--prompts")
    heldout = _lines(args.heldout, TINY_HELDOUT if tiny else [], "--heldout")
    device = _init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tiny:
        bundle, defaults = tiny_bundle(device=device), TINY_DEFAULTS
    else:
        bundle = diffusers_bundle(args.model, device=device, height=args.height, width=args.width,
                                  guidance=args.guidance)
        defaults = bundle.defaults
    values = cli_values(args)
    values["steps"] = args.steps or defaults["steps"]
    values["cfg"] = args.cfg if args.cfg is not None else defaults["cfg"]
    config = config_from_options(values, sampler=args.sampler, scheduler=args.scheduler or defaults["scheduler"])
    return bundle, config, prompts, heldout


def train_and_report(bundle, config, reward, prompts, heldout, out, name, resume=False, log=print, overwrite=False):
    """Train, write the files, return a summary dict (rewards before/after, paths). Under torchrun only rank 0
    logs and writes; every rank returns once the files are written."""
    if not _is_main():
        log = _quiet
    files = output_files(out, name, resume, overwrite)
    lora_path = files.lora
    stem = os.path.splitext(lora_path)[0]
    trainer = Trainer(bundle, reward, config, prompts=prompts, heldout=heldout, lora_path=lora_path,
                      state_path=files.state, run_name=files.listed_name,
                      on_step=lambda r, t: log(f"step {r['step']:4d}  reward {r['reward']:.4f}  loss {r['loss']:.4f}"
                                               f"  |g| {r['grad_norm']:.3g}  {r['seconds']:.2f}s"
                                               + (f"  held-out {r['heldout_reward']:.4f}" if 'heldout_reward' in r
                                                  else "")))
    if resume and os.path.exists(lora_path):
        trainer.resume()
        log(f"resumed {lora_path} at step {trainer.step}")
    shown = (prompts + heldout)[: 2 * config.batch_size]
    before_imgs, before_r = trainer.sample_images(shown, seed=config.seed, scale=0.0)
    t0 = time.perf_counter()
    try:
        result = trainer.train()
    except TrainingStopped as stop:
        log(str(stop))
        raise SystemExit(1) from None
    seconds = time.perf_counter() - t0
    after_imgs, after_r = trainer.sample_images(shown, seed=config.seed)
    summary = {"reward_before": float(before_r.mean()), "reward_after": float(after_r.mean()),
               "steps": result.step, "status": result.status, "train_seconds": seconds, "lora": lora_path}
    if trainer.is_main:
        save_png(before_imgs, stem + "_before.png", columns=config.batch_size)
        save_png(after_imgs, stem + "_after.png", columns=config.batch_size)
        save_image(training_curve(result.log, f"{config.method} on {getattr(reward, 'name', 'reward')}"),
                   stem + "_curve.png")
        record = {"summary": summary, "config": vars_of(config), "log": result.log}
        ckpt.atomic_write_text(stem + "_log.json", json.dumps(record, indent=1))
        summary.update(before=stem + "_before.png", after=stem + "_after.png", curve=stem + "_curve.png")
    _barrier()
    return summary


def _quiet(*_):
    pass


def vars_of(config):
    from dataclasses import asdict
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def run_train(args):
    from ..rewards import load_reward, registry

    output_files(args.out, args.name, args.resume, args.overwrite)       # a bad name fails before any work
    registry.resolve_files(args.reward)                                  # so do an unknown reward and missing weights
    bundle, config, prompts, heldout = build(args)
    reward = load_reward(args.reward, device=bundle.device)
    summary = train_and_report(bundle, config, reward, prompts, heldout, args.out, args.name, args.resume,
                               overwrite=args.overwrite)
    if _is_main():
        print(f"reward before {summary['reward_before']:.4f}  after {summary['reward_after']:.4f}  "
              f"({summary['steps']} steps, {summary['train_seconds']:.0f}s); LoRA: {summary['lora']}")
    return 0


DEMO_KL_WEIGHT = 1.0      # NeMo DRaFT+ kl_coeff; on the tiny model it keeps the shapes while the reward rises (README)


def demo_training(out_dir, train_steps=40, seed=0, reward_name="colourfulness", log=print, model=None,
                  kl_weight=DEMO_KL_WEIGHT):
    """The README demo on the embedded tiny model: DRaFT-1 against a weight-free reward, once plain and once with
    the DRaFT+ penalty to the frozen model (``kl_weight``), from the same seed. Writes demo_comparison.png (base |
    DRaFT-1 | DRaFT+ on held-out prompts, enlarged, each with its held-out reward and how many images still show
    their caption; scored on two noises per caption, one shown), demo_curves.png, both LoRAs and demo_summary.json;
    returns the summary.
    ``model``: a TinyModel to use instead of the shipped one (tests)."""
    import copy

    from ..rewards import load_reward
    from ..tiny.data import caption_accuracy
    from .bundle import tiny_bundle

    reward = load_reward(reward_name)
    shown = TINY_HELDOUT * 2                       # every held-out caption twice (two noises)
    runs = [("DRaFT-1", "demo_draft", 0.0), ("DRaFT+ (KL to base)", "demo_draft_plus", kl_weight)]
    summary, panels, curves, t0 = {"reward": reward_name, "train_steps": train_steps, "runs": {}}, [], {}, time.perf_counter()
    for label, name, kl in runs:
        torch.manual_seed(seed)
        config = DraftConfig(method="draft_k", k=1, steps=6, scheduler="simple", cfg=3.0, batch_size=4, lr=2e-3,
                             rank=4, targets=None, train_steps=train_steps, seed=seed, kl_weight=kl,
                             heldout_every=max(1, train_steps // 4), save_every=0)
        bundle = tiny_bundle(copy.deepcopy(model) if model is not None else None)
        trainer = Trainer(bundle, reward, config, prompts=TINY_PROMPTS, heldout=TINY_HELDOUT,
                          lora_path=ckpt.run_files(name, root=out_dir, lora_folder="").prepare().lora, run_id=name)
        if not panels:                             # the base model: LoRA strength 0
            images, rewards = trainer.sample_images(shown, seed=seed + 1, scale=0.0)
            summary["base"] = {"heldout_reward": float(rewards.mean()),
                               "caption_accuracy": caption_accuracy(images, shown),
                               "heldout_during_training": trainer.evaluate(scale=0.0)}   # the curves' step 0
            panels.append((["base model", f"held-out reward {summary['base']['heldout_reward']:.3f}",
                            f"captions right {summary['base']['caption_accuracy']:.0%}"], images[:len(TINY_HELDOUT)]))
        trainer.train()
        images, rewards = trainer.sample_images(shown, seed=seed + 1)
        record = {"kl_weight": kl, "heldout_reward": float(rewards.mean()),
                  "caption_accuracy": caption_accuracy(images, shown), "lora": trainer.lora_path,
                  "log": [{k: v for k, v in r.items() if k != "seconds"} for r in trainer.log]}
        summary["runs"][label] = record
        panels.append(([label, f"held-out reward {record['heldout_reward']:.3f}",
                        f"captions right {record['caption_accuracy']:.0%}"], images[:len(TINY_HELDOUT)]))
        curves[f"{label} reward"] = [r["reward"] for r in trainer.log]
        log(f"{label}: held-out reward {summary['base']['heldout_reward']:.4f} -> {record['heldout_reward']:.4f}, "
            f"captions right {summary['base']['caption_accuracy']:.0%} -> {record['caption_accuracy']:.0%}")
    summary["seconds"] = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    comparison = os.path.join(out_dir, "demo_comparison.png")
    save_image(labelled_panels(panels, columns=3, scale=4), comparison)
    steps = [r["step"] for r in next(iter(summary["runs"].values()))["log"]]
    scored = [0] + [r["step"] for r in next(iter(summary["runs"].values()))["log"] if "heldout_reward" in r]
    held = {f"{label} held-out": [summary["base"]["heldout_during_training"]] +
            [r["heldout_reward"] for r in record["log"] if "heldout_reward" in r]
            for label, record in summary["runs"].items()}
    curve_png = os.path.join(out_dir, "demo_curves.png")
    save_image(stack_images([line_plot(curves, title=f"{reward_name}: training reward", xlabel="step", x=steps),
                             line_plot(held, title="held-out reward (step 0: the base model)", xlabel="step",
                                       x=scored)]), curve_png)
    summary.update(comparison=comparison, curves=curve_png)
    ckpt.atomic_write_text(os.path.join(out_dir, "demo_summary.json"), json.dumps(summary, indent=1))
    log(f"wrote {comparison}, {curve_png} and the LoRAs to {out_dir}")
    return summary
