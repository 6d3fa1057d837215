"""The ``rewardlab`` command line. One function per subcommand; each registers its own arguments.

    rewardlab demo [--out DIR]     sample the embedded tiny model, then DRaFT-train two LoRAs on it (plain and with
                                   the DRaFT+ penalty) and compare them with the base model on held-out prompts
"""
import argparse
import math
import sys
from pathlib import Path

DEMO_CAPTIONS = (
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a white cross on a red background",
    "a blue circle on a yellow background",
    "a black square on a green background",
)


def at_least(minimum, kind=int, exclusive=False):
    """An argparse ``type`` for a finite number >= ``minimum`` (> with ``exclusive``); anything else is a one-line
    usage error with exit status 2."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if exclusive else '>='} {minimum}, "
                                             f"got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in its messages
    return parse


def one_line(error):
    """An exception's message on one line (CLI errors end with exactly one line)."""
    return " ".join(str(error).split()) or type(error).__name__


def demo_sample(args):
    """Stage 1 of the demo: a grid of samples from the embedded model, one row per caption."""
    from .plots import save_png
    from .tiny.model import load_tiny
    model = load_tiny()
    captions = list(args.captions or DEMO_CAPTIONS)
    prompts = [c for c in captions for _ in range(args.per_caption)]
    images = model.generate(prompts, steps=args.steps, cfg=args.cfg, seed=args.seed, sampler=args.sampler)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (prompt, image) in enumerate(zip(prompts, images)):
        path = out / f"sample_{k:03d}.png"
        save_png(image[None], path, scale=args.scale)
        written.append((path, prompt))
    grid_path = out / "grid.png"
    save_png(images, grid_path, columns=args.per_caption, scale=args.scale)
    (out / "captions.txt").write_text("".join(f"{p.name}\t{c}\n" for p, c in written))
    print(f"wrote {len(written)} samples, {grid_path} (one row per caption) and {out / 'captions.txt'}")
    return dict(images=images, prompts=prompts, grid=grid_path, files=[p for p, _ in written])


def cmd_demo(args):
    if args.kl_weight is None:
        from .training.cli import DEMO_KL_WEIGHT
        args.kl_weight = DEMO_KL_WEIGHT
    """``rewardlab demo``: the whole loop on the embedded model, no downloads."""
    result = demo_sample(args)
    if args.train_steps > 0:        # stage 2: DRaFT vs DRaFT+ on a weight-free reward (training/cli.py)
        from .training.cli import demo_training
        result["draft"] = demo_training(str(Path(args.out) / "draft"), train_steps=args.train_steps, seed=args.seed,
                                        kl_weight=args.kl_weight)
    return result


def add_demo_parser(subparsers):
    p = subparsers.add_parser("demo", help="sample the embedded tiny model, then DRaFT-train LoRAs on a weight-free "
                              "reward, with and without the DRaFT+ penalty, and compare them on held-out prompts")
    p.add_argument("--out", default="./rewardlab_out/demo", help="output folder (created if missing)")
    p.add_argument("--captions", nargs="+", help="captions to sample (default: a fixed set of six)")
    p.add_argument("--per-caption", type=at_least(1), default=4, help="samples per caption (one grid row each)")
    p.add_argument("--steps", type=at_least(1), default=20, help="sampling steps")
    p.add_argument("--cfg", type=at_least(0.0, float), default=3.0, help="classifier-free guidance scale")
    from .samplers.steps import STEPS
    p.add_argument("--sampler", default="euler", choices=list(STEPS), help="step function")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--scale", type=at_least(1), default=4, help="nearest-neighbour upscaling of the written PNGs")
    p.add_argument("--train-steps", type=at_least(0), default=40, help="DRaFT training steps of stage 2 (0: skip)")
    p.add_argument("--kl-weight", type=at_least(0.0, float), default=None,
                   help="DRaFT+ penalty weight of the second LoRA (default: 1.0, NeMo's kl_coeff)")
    p.set_defaults(func=cmd_demo)


def build_parser():
    parser = argparse.ArgumentParser(prog="rewardlab", description="RewardLab: reward alignment for diffusion "
                                     "models (standalone tools; the ComfyUI nodes live in the same package).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(subparsers)
    from .batch.cli import add_run_subcommand  # rewardlab run: batch runs on a ComfyUI server
    add_run_subcommand(subparsers)
    from .training.cli import add_train_command  # rewardlab train: DRaFT LoRA training
    add_train_command(subparsers)
    return parser


def user_errors():
    """Exceptions that mean "bad input" (a setting, a name, a file, a reward): one line and status 2, no traceback."""
    from .rewards.weights import RewardWeightsError
    return (ValueError, LookupError, OSError, RewardWeightsError)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except user_errors() as e:
        print(f"rewardlab {args.command}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0

