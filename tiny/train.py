"""Train the embedded tiny model from scratch on the procedural shapes data (reproducible, CPU).

    python -m rewardlab.tiny.train --out tiny/ --eval     # the shipped weights (4000 steps, 20 min on an idle 2-core CPU)
    python -m rewardlab.tiny.train --out /tmp/t --steps 50 # a quick check

DDPM loss with the v-prediction target (Salimans & Ho 2022; see model.DEFAULT_SCHEDULE for why), captions dropped to "" with probability ``dropout`` so the same network
learns the unconditional prediction that classifier-free guidance needs. Text encoder and UNet train jointly
with AdamW; an exponential moving average of the weights is what gets saved. Fixed seeds throughout: data,
noise, timesteps and dropout all come from one ``torch.Generator``.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .model import CONFIG, DEFAULT_SCHEDULE, DEFAULT_TEXT, DEFAULT_UNET, PATCH, PatchUNet, TinyModel, build_unet, \
    ddpm_scheduler, save_tiny, to_model_space
from .text import Tokenizer, TinyTextEncoder


def target(scheduler, x0, noise, t):
    """What the network learns to predict: ε, or v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def drop_captions(captions, p, generator):
    """Replace each caption by "" (the unconditional prompt) with probability p."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def lr_at(step, steps, warmup):
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema_params, params, decay):
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def train(out=None, steps=4000, batch_size=32, lr=1.5e-3, seed=0, threads=2, dropout=0.1, ema_decay=0.999,
          warmup=100, unet_config=DEFAULT_UNET, text_config=DEFAULT_TEXT, log_every=50, log=print,
          save_every=None):
    """Train and (when ``out`` is given) save the EMA weights there. Returns a dict with the EMA
    ``model`` (a TinyModel), the raw ``losses`` and the wall-clock ``seconds``."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)                              # parameter initialisation
    unet, text = build_unet(unet_config), TinyTextEncoder(**text_config)
    net = PatchUNet(unet)
    tokenizer = Tokenizer(max_length=text.config["max_length"])
    scheduler = ddpm_scheduler(DEFAULT_SCHEDULE)
    modules = torch.nn.ModuleDict(dict(unet=unet, text=text))
    ema = torch.nn.ModuleDict(dict(unet=build_unet(unet_config), text=TinyTextEncoder(**text_config)))
    ema.load_state_dict(modules.state_dict())
    ema.requires_grad_(False)
    params = list(modules.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, warmup))
    g = torch.Generator().manual_seed(seed)
    T = scheduler.config.num_train_timesteps
    losses, start = [], time.time()
    for step in range(steps):
        batch = data.random_batch(batch_size, g)
        x0 = to_model_space(batch.images)
        ids = tokenizer(drop_captions(batch.captions, dropout, g))
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, T, (batch_size,), generator=g)
        pred = net(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text(ids))
        loss = F.mse_loss(pred, target(scheduler, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # Short runs: let the average warm up instead of remembering the random initialisation.
        ema_update(list(ema.parameters()), params, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if out is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_tiny(ema["unet"], ema["text"], f"{out}/step{step + 1}")      # for watching a long run
        if log and (step % log_every == 0 or step == steps - 1):
            recent = losses[-log_every:]
            log(f"step {step:5d}/{steps}  loss {sum(recent) / len(recent):.4f}  {time.time() - start:7.1f}s")
    seconds = time.time() - start
    meta = dict(training=dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                              dropout=dropout, ema_decay=ema_decay, warmup=warmup, seconds=round(seconds, 1),
                              final_loss=sum(losses[-100:]) / len(losses[-100:])))
    if out is not None:
        path = save_tiny(ema["unet"], ema["text"], out, extra=meta)
        log and log(f"saved {path} after {seconds:.0f}s")
    config = dict(unet=dict(unet_config), text=text.config, patch=PATCH, schedule=DEFAULT_SCHEDULE, **meta)
    model = TinyModel(ema["unet"], ema["text"], scheduler.alphas_cumprod, config).eval()
    return dict(model=model, losses=losses, seconds=seconds)


@torch.no_grad()
def evaluate(model, seed=0, steps=20, cfg=3.0, sampler="euler", scheduler="karras", batch=60):
    """Generate one image per caption of the grammar and score it with ``data.classify``.
    Returns accuracies of shape colour, background colour (chance 1/6) and shape (chance 1/4)."""
    captions = data.all_captions()
    truth = torch.tensor([(data.SHAPES.index(w[2]), data.COLOR_NAMES.index(w[1]), data.COLOR_NAMES.index(w[-2]))
                          for w in (c.split() for c in captions)])
    hits = torch.zeros(3)
    for i in range(0, len(captions), batch):
        images = model.generate(captions[i:i + batch], steps=steps, cfg=cfg, seed=seed + i, sampler=sampler,
                                scheduler=scheduler)
        hits += (torch.stack(data.classify(images), 1) == truth[i:i + batch]).sum(0)
    acc = (hits / len(captions)).tolist()
    return dict(shape=acc[0], shape_color=acc[1], background=acc[2], n=len(captions))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the embedded tiny RewardLab model (CPU, reproducible).")
    parser.add_argument("--out", required=True, help="folder for tiny_model.safetensors + tiny_model.json")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared, oversubscribed 2-core machine a second thread mostly waits (and the shipped
    # weights were made with one, so results match bit for bit).
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--save-every", type=int, default=0, help="also save EMA snapshots to OUT/stepN")
    parser.add_argument("--eval", action="store_true", help="score samples with the colour statistic at the end")
    args = parser.parse_args(argv)
    result = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   threads=args.threads, save_every=args.save_every)
    if args.eval:
        scores = evaluate(result["model"])
        print("recognisability:", scores)
        config_file = Path(args.out) / CONFIG.name          # keep the measurement beside the weights
        config = json.loads(config_file.read_text())
        config["eval"] = dict(scores, protocol="every caption once, euler, karras, 20 steps, cfg 3, seed 0")
        config_file.write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
    main()
