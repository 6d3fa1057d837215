"""Scoring whole image batches: in chunks, with progress and Cancel, as a table, and as pixel gradients."""
import torch

from .. import runtime


def score_batch(reward, images_bchw, prompts, batch_size=8, with_components=False):
    """Scores (Tensor[B] on CPU) of a whole batch, in chunks, with progress and cancel; optionally the ensemble
    members' raw scores as {name: Tensor[B]}."""
    n = images_bchw.shape[0]
    bar = runtime.current().progress(n)
    scores, parts = [], {}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            runtime.current().check_interrupt()
            chunk = images_bchw[start:start + batch_size]
            p = prompts[start:start + batch_size] if prompts else None
            scores.append(reward(chunk, p).float().cpu())
            for name, value in getattr(reward, "last_components", {}).items() if with_components else ():
                parts.setdefault(name, []).append(value.float().cpu())
            bar.update(chunk.shape[0])
    return torch.cat(scores), {k: torch.cat(v) for k, v in parts.items()}


def score_table(scores, prompts=None, components=None, order=None, title=""):
    """A readable fixed-width table: (rank,) image index, score, ensemble members, prompt; then mean/min/max."""
    components = components or {}
    ranked = order is not None
    order = list(range(len(scores))) if order is None else order
    head = (f"{'rank':>4} " if ranked else "") + f"{'image':>5} {'score':>10}" + "".join(f" {k[:14]:>14}" for k in components)
    rows = ([title] if title else []) + [head + "  prompt"]
    for rank, i in enumerate(order):
        row = (f"{rank + 1:>4} " if ranked else "") + f"{i:>5} {scores[i]:>10.4f}"
        row += "".join(f" {v[i].item():>14.4f}" for v in components.values())
        rows.append(row + "  " + (prompts[i][:60] if prompts else ""))
    rows.append(f"mean {scores.mean().item():.4f}  min {scores.min().item():.4f}  max {scores.max().item():.4f}  n {len(scores)}")
    return "\n".join(rows)


def reward_gradient(reward, images_bchw, prompts, batch_size=8):
    """d(reward)/d(pixels) for every image (each image's gradient is that of its own score), and the scores."""
    grads, scores = [], []
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, images_bchw.shape[0], batch_size):
            runtime.current().check_interrupt()
            # A clone made outside inference mode is a normal tensor that autograd may save.
            x = images_bchw[start:start + batch_size].clone().requires_grad_(True)
            s = reward(x, prompts[start:start + batch_size] if prompts else None)
            (g,) = torch.autograd.grad(s.sum(), x)
            grads.append(g.float().cpu())
            scores.append(s.detach().float().cpu())
    return torch.cat(grads), torch.cat(scores)
