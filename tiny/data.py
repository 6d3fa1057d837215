"""Procedurally generated captioned data: one coloured shape on a plain background, 32×32 RGB.

Captions follow one grammar, "a {colour} {shape} on a {colour} background", so the text encoder's vocabulary
is closed and a colour statistic can check whether a generated image matches its caption. Everything is
rendered with tensor ops from a ``torch.Generator``: the same seed always gives the same images.
"""
from dataclasses import dataclass

import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {                      # well separated in RGB so the nearest-palette statistic is unambiguous
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
COLOR_NAMES = tuple(COLORS)
PALETTE = torch.tensor(list(COLORS.values()))          # (n_colours, 3) in [0, 1]


def caption(shape, color, background):
    return f"a {color} {shape} on a {background} background"


@dataclass
class Batch:
    images: torch.Tensor        # (N, 3, SIZE, SIZE) float in [0, 1]
    captions: list              # N strings
    shape: torch.Tensor         # (N,) index into SHAPES
    color: torch.Tensor         # (N,) index into COLOR_NAMES (the shape's colour)
    background: torch.Tensor    # (N,) index into COLOR_NAMES; never equal to ``color``


def shape_masks(shape, cx, cy, radius, size=SIZE):
    """Soft (anti-aliased) masks (N, size, size) in [0, 1] from a signed distance in pixels.
    The shape is centred at (cx, cy) with half-extent ``radius``; every shape covers its centre."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = coords.view(1, -1, 1), coords.view(1, 1, -1)
    dx, dy = x - cx.view(-1, 1, 1), y - cy.view(-1, 1, 1)
    r = radius.view(-1, 1, 1)
    circle = (dx**2 + dy**2).sqrt() - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    # Upward triangle, apex (0, -r), base corners (±r, 0.8r): the max of its edge half-plane distances.
    base = dy - 0.8 * r
    side = (1.8 * dx.abs() - (dy + r)) / (1.8**2 + 1) ** 0.5
    triangle = torch.maximum(base, side)
    arm = 0.35 * r
    cross = torch.minimum(torch.maximum(dx.abs() - r, dy.abs() - arm), torch.maximum(dx.abs() - arm, dy.abs() - r))
    sdf = torch.stack([circle, square, triangle, cross])               # (4, N, size, size)
    picked = sdf.gather(0, shape.view(1, -1, 1, 1).expand(1, *circle.shape))[0]
    return (0.5 - picked).clamp(0, 1)


def render(shape, color, background, cx, cy, radius, size=SIZE):
    """Images (N, 3, size, size) for the given label indices and geometry."""
    mask = shape_masks(shape, cx, cy, radius, size).unsqueeze(1)
    fg = PALETTE[color].view(-1, 3, 1, 1)
    bg = PALETTE[background].view(-1, 3, 1, 1)
    return mask * fg + (1 - mask) * bg


def random_labels(n, generator):
    """Uniform shapes and colours, with the background colour always different from the shape's."""
    k = len(COLOR_NAMES)
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    color = torch.randint(k, (n,), generator=generator)
    background = (color + torch.randint(1, k, (n,), generator=generator)) % k
    return shape, color, background


def random_batch(n, generator, size=SIZE):
    """n random captioned images; the shape sits near the centre with a random size and small offset."""
    shape, color, background = random_labels(n, generator)
    unit = torch.rand(3, n, generator=generator)
    radius = size * (0.25 + 0.1 * unit[0])                      # 8 to 11 px at 32×32
    cx = size / 2 + (unit[1] - 0.5) * size * 0.15               # ±2.4 px jitter keeps the centre covered
    cy = size / 2 + (unit[2] - 0.5) * size * 0.15
    images = render(shape, color, background, cx, cy, radius, size)
    captions = [caption(SHAPES[s], COLOR_NAMES[c], COLOR_NAMES[b]) for s, c, b in
                zip(shape.tolist(), color.tolist(), background.tolist())]
    return Batch(images, captions, shape, color, background)


def make_dataset(n, seed=0, size=SIZE):
    """A fixed data set of n examples, deterministic from ``seed``."""
    return random_batch(n, torch.Generator().manual_seed(seed), size)


def all_captions():
    """Every caption of the grammar (shape × colour × different background colour)."""
    return [caption(s, c, b) for s in SHAPES for c in COLOR_NAMES for b in COLOR_NAMES if b != c]


def nearest_color(rgb):
    """Index of the nearest palette colour for (..., 3) RGB values in [0, 1]."""
    return torch.cdist(rgb.reshape(-1, 3).float(), PALETTE).argmin(-1).view(rgb.shape[:-1])


def color_statistic(images, centre=4, border=2):
    """Guess (shape colour, background colour) of each image (N, 3, H, W) in [0, 1]: the most common
    nearest-palette colour in a central square, and along the border frame. Used to score samples."""
    labels = nearest_color(images.permute(0, 2, 3, 1))                 # (N, H, W)
    h, w = labels.shape[1:]
    top, left = (h - centre) // 2, (w - centre) // 2
    middle = labels[:, top:top + centre, left:left + centre].flatten(1)
    frame = torch.ones(h, w, dtype=torch.bool)
    frame[border:h - border, border:w - border] = False
    edge = labels[:, frame]
    return middle.mode(1).values, edge.mode(1).values


def _templates(size=SIZE):
    """Binary masks of every shape over a small grid of the training positions and sizes: (S, K, H, W)."""
    offsets = torch.linspace(-2.4, 2.4, 5) * size / 32 + size / 2
    radii = size * torch.linspace(0.25, 0.35, 4)
    cy, cx, r = (t.flatten() for t in torch.meshgrid(offsets, offsets, radii, indexing="ij"))
    return torch.stack([shape_masks(torch.full_like(r, s, dtype=torch.long), cx, cy, r, size) > 0.5
                        for s in range(len(SHAPES))])


def classify(images):
    """Guess (shape, shape colour, background colour) of each image (N, 3, H, W) in [0, 1]. Colours come from
    ``color_statistic``; the shape is the template (shape × position × size) with the highest IoU against the
    pixels nearest to the shape colour. A nearest-template classifier: no training, exact on clean data."""
    fg, bg = color_statistic(images)
    mask = nearest_color(images.permute(0, 2, 3, 1)) == fg.view(-1, 1, 1)             # (N, H, W)
    templates = _templates(images.shape[-1]).flatten(2).float()                        # (S, K, HW)
    m = mask.flatten(1).float()
    inter = torch.einsum("np,skp->nsk", m, templates)
    union = m.sum(1).view(-1, 1, 1) + templates.sum(-1) - inter
    shape = (inter / union).amax(-1).argmax(-1)
    return shape, fg, bg


def caption_accuracy(images, captions):
    """Fraction of images whose classified shape, shape colour and background all match their caption (a check of
    what the image shows that a colour- or brightness-type reward does not see: reward hacking lowers it)."""
    shape, fg, bg = classify(images)
    hits = 0
    for i, text in enumerate(captions):
        words = text.split()             # "a {colour} {shape} on a {colour} background"
        hits += (SHAPES[shape[i]] == words[2] and COLOR_NAMES[fg[i]] == words[1] and COLOR_NAMES[bg[i]] == words[5])
    return hits / len(captions)
