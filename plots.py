"""Pictures the pack makes: line plots, image grids, heatmaps and PNG files. The one place for each.

Plots are drawn with PIL and returned as a ComfyUI IMAGE (1, H, W, 3), so curves show up in the graph like any
other image (preview, save, compare) without a matplotlib dependency; the command line writes the same pictures as
PNG files."""
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 28, 40


def _nice_ticks(lo, hi, count=5):
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=mag * 10)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step) + 1)]


def _fmt(v):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _finite_range(values):
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-3)
    return lo - pad, hi + pad


def line_plot(series, title="", xlabel="", ylabel="", x=None, markers=None, size=(640, 360)):
    """Plot named series of floats. ``x`` is shared x values (default: 0..n-1); ``markers`` is a list of x
    positions drawn as dashed vertical lines (e.g. checkpoints, guidance interval edges)."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    series = {k: [float(v) for v in vs] for k, vs in series.items() if len(vs)}
    n = max((len(v) for v in series.values()), default=0)
    xs = [float(v) for v in x] if x is not None else list(range(n))
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi == x_lo:
        x_hi = x_lo + 1.0
    y_lo, y_hi = _finite_range([v for vs in series.values() for v in vs])
    pw, ph = w - MARGIN_L - MARGIN_R, h - MARGIN_T - MARGIN_B

    def px(xv, yv):
        return (MARGIN_L + (xv - x_lo) / (x_hi - x_lo) * pw, MARGIN_T + (1 - (yv - y_lo) / (y_hi - y_lo)) * ph)

    d.rectangle([MARGIN_L, MARGIN_T, w - MARGIN_R, h - MARGIN_B], outline=(0, 0, 0))
    for t in _nice_ticks(y_lo, y_hi):
        _, yy = px(x_lo, t)
        d.line([MARGIN_L, yy, w - MARGIN_R, yy], fill=(230, 230, 230))
        d.text((4, yy - 6), _fmt(t), fill=(0, 0, 0))
    for t in _nice_ticks(x_lo, x_hi):
        xx, _ = px(t, y_lo)
        d.text((xx - 8, h - MARGIN_B + 4), _fmt(t), fill=(0, 0, 0))
    for m in markers or []:
        xx, _ = px(float(m), y_lo)
        for y0 in range(MARGIN_T, h - MARGIN_B, 8):
            d.line([xx, y0, xx, y0 + 4], fill=(120, 120, 120))
    for k, (name, vs) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [px(xs[i], v) for i, v in enumerate(vs) if i < len(xs) and math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        d.text((MARGIN_L + 8, MARGIN_T + 4 + 12 * k), name, fill=colour)
    d.text((MARGIN_L, 8), title, fill=(0, 0, 0))
    d.text((MARGIN_L + pw // 2 - 4 * len(xlabel), h - 16), xlabel, fill=(0, 0, 0))
    d.text((w - MARGIN_R - 6 * len(ylabel), 8), ylabel, fill=(80, 80, 80))   # y label top-right, beside the title
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def training_curve(log, title="DRaFT training"):
    """Reward and loss per training step; the held-out reward (scored every N steps) is drawn as a step line."""
    series = {"reward": [r["reward"] for r in log], "loss": [r["loss"] for r in log]}
    if any(r.get("heldout_reward") is not None for r in log):
        held, last = [], None
        for r in log:
            last = r["heldout_reward"] if r.get("heldout_reward") is not None else last
            held.append(last if last is not None else float("nan"))
        series["held-out reward"] = held
    return line_plot(series, title=title, xlabel="training step", ylabel="value", x=[r["step"] for r in log])


def image_grid(images, columns=None, pad=2):
    """(B, 3, H, W) in [0, 1] -> one ComfyUI IMAGE (1, rows·H, cols·W, 3) with white ``pad``-pixel gaps."""
    b, c, h, w = images.shape
    cols = columns or max(1, min(b, int(round(b ** 0.5 + 0.49))))
    rows = -(-b // cols)
    grid = torch.ones(c, rows * (h + pad) - pad, cols * (w + pad) - pad)
    for i in range(b):
        r, q = divmod(i, cols)
        grid[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = images[i].float().cpu()
    return grid.clamp(0, 1).movedim(0, -1).unsqueeze(0)


def labelled_panels(panels, columns=2, scale=4, gap=12):
    """Image grids side by side, each under its caption lines: ``panels`` is a list of (lines, images (B, 3, H, W)
    in [0, 1]). Images are enlarged ``scale`` times (nearest neighbour). Returns one ComfyUI IMAGE."""
    grids = []
    for lines, images in panels:
        if scale > 1:
            images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
        grids.append((lines, image_grid(images, columns)[0]))
    header = 8 + 12 * max(len(lines) for lines, _ in grids)
    height = header + max(g.shape[0] for _, g in grids)
    width = sum(g.shape[1] for _, g in grids) + gap * (len(grids) + 1)
    canvas = Image.new("RGB", (width, height + gap), "white")
    d = ImageDraw.Draw(canvas)
    x = gap
    for lines, grid in grids:
        for k, line in enumerate(lines):
            d.text((x, 4 + 12 * k), line, fill=(0, 0, 0))
        canvas.paste(Image.fromarray((grid.numpy() * 255).round().astype("uint8")), (x, header))
        x += grid.shape[1] + gap
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


def stack_images(images, gap=8):
    """ComfyUI IMAGEs (1, H, W, 3) stacked vertically on white (plots of different sizes)."""
    width = max(i.shape[2] for i in images)
    out = torch.ones(1, sum(i.shape[1] for i in images) + gap * (len(images) - 1), width, 3)
    y = 0
    for i in images:
        out[:, y:y + i.shape[1], :i.shape[2]] = i
        y += i.shape[1] + gap
    return out


def heat_colours(h):
    """Black-red-yellow-white map for h in [0, 1], (B, 1, H, W) -> (B, 3, H, W)."""
    return torch.cat([(3 * h).clamp(0, 1), (3 * h - 1).clamp(0, 1), (3 * h - 2).clamp(0, 1)], 1)


def save_image(image, path):
    """Write the first image of a ComfyUI IMAGE (B, H, W, 3) in [0, 1] as an 8-bit PNG."""
    pixels = (image[0].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(pixels).save(path)


def save_png(images, path, columns=None, scale=1):
    """Write a batch (B, 3, H, W) in [0, 1] as one PNG grid, enlarged ``scale`` times (nearest neighbour, so 32 px
    samples stay crisp)."""
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    save_image(image_grid(images, columns), path)
