"""The user-facing DRaFT settings, once: the command line's arguments and the node's inputs both come from ``OPTIONS``.

Each option names the ``DraftConfig`` field it sets; its default is that field's default, its type that default's
type. ``choices`` maps what the user picks (a label) to the config value. ``ui`` says where it appears: "node"
(a required node input and a CLI flag), "node-optional" (an optional node input and a CLI flag) or "cli" (the
command line only).

``PRESETS`` holds each method's published recipe; the ``preset`` option "paper" applies it over every other
setting (DraftConfig.__post_init__), "custom" leaves the settings to the user. The source of every value is in
docs/methods.md §1 (one row per value).
"""
import math
from dataclasses import MISSING, dataclass, fields

from .draft import METHODS, PRECISIONS, PRESET_NAMES, DraftConfig
from .lora import TARGET_CHOICES


@dataclass(frozen=True)
class Option:
    field: str                 # the DraftConfig field
    help: str
    name: str = None           # node input name (default: the field); the CLI flag is --name with dashes
    flag: str = None           # a CLI flag that differs from --name
    range: tuple = None        # (min, max, step) of a number
    choices: dict = None       # label -> config value
    ui: str = "node"           # "node", "node-optional" or "cli"
    type: type = None          # when the default (None) does not tell it

    @property
    def input_name(self):
        return self.name or self.field

    @property
    def cli_flag(self):
        return self.flag or "--" + self.input_name.replace("_", "-")

    @property
    def default(self):
        f = _FIELDS[self.field]
        value = f.default if f.default is not MISSING else f.default_factory()
        if self.choices is not None:
            return next(label for label, v in self.choices.items() if v == value)
        return value

    @property
    def value_type(self):
        return self.type or type(self.default)

    @property
    def cli_choices(self):
        """Choices on the command line: the config values when they are words (draft_k), else the labels."""
        values = list(self.choices.values())
        return values if all(isinstance(v, str) and " " not in v for v in values) else list(self.choices)

    def to_config(self, value):
        """The config value of a label (what a node shows) or of a config value itself (the command line)."""
        if self.choices is None:
            return value
        if value in self.choices:
            return self.choices[value]
        if value in self.cli_choices:
            return value
        raise ValueError(f"{self.input_name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")


_FIELDS = {f.name: f for f in fields(DraftConfig)}

# --- the published recipes ("paper" preset). Sources: docs/methods.md §1.1–1.6, one per value. ----------------------
_DDIM50 = dict(steps=50, sampler="euler", scheduler="ddim_uniform")     # DDIM η = 0, 50 "leading" steps (SD's DDIM)
_DRAFT = dict(_DDIM50, cfg=7.5, rank=8, lr=4e-4, weight_decay=0.1, batch_size=4, grad_accum=1, train_steps=2000,
              loss="negative", loss_scale=1.0)
PRESETS = {
    "draft": _DRAFT,
    "draft_k": dict(_DRAFT, k=1),
    "draft_lv": dict(_DRAFT, lv_n=2, lv_reduction="sum"),
    # mihirp1998/AlignProp, config/align_prop.py (aesthetic): truncation K ~ U[0, 50], lr 1e-3, weight decay 0.1,
    # max_grad_norm 5, loss_coeff 0.01, total batch 128, 7 epochs of 2 optimiser steps, LoRA rank 4, CFG 7.5, DDIM 50
    "alignprop": dict(_DDIM50, cfg=7.5, rank=4, lr=1e-3, weight_decay=0.1, max_grad_norm=5.0, batch_size=4,
                      grad_accum=32, train_steps=14, k_min=1, k_max=0, loss="negative", loss_scale=0.01),
    # THUDM/ImageReward, ImageReward/ReFL.py + scripts/train_refl.sh: DDPM 40 steps, m ~ U{30..39}, no CFG,
    # ReLU(2 − r)·1e-3, AdamW lr 1e-5, weight decay 1e-2, clip 1.0, batch 2 × 4 accumulation × 8 GPUs, 100 steps
    "refl": dict(steps=40, sampler="euler_ancestral", scheduler="ddim_uniform", cfg=1.0, refl_first=30, refl_last=39,
                 loss="hinge", reward_cap=2.0, loss_scale=1e-3, lr=1e-5, weight_decay=1e-2, max_grad_norm=1.0,
                 batch_size=2, grad_accum=32, train_steps=100),
    "drtune": dict(drtune_offset="random"),
}


def paper_values(method):
    """The fields the "paper" preset sets for ``method`` (an empty dict for an unknown method: validate names it)."""
    return dict(PRESETS.get(method, {}))

OPTIONS = (
    Option("method", "DRaFT-K: grad through the last K steps. DRaFT-LV: n re-noised copies of the final sample. "
           "AlignProp: K drawn per trajectory in [k_min, k_max] (default: the whole chain). ReFL: one step "
           "mid-chain. DRTune: K evenly spaced steps with stop-grad input. DRaFT (full): every step.",
           choices={m.label: m.name for m in METHODS.values()}),
    Option("preset", "paper: the method's published recipe (steps, sampler, cfg, loss, optimiser, batch, LoRA rank, "
           "K...) overrides the other settings; the values and their sources are in docs/methods.md. custom: the "
           "settings as given.", choices={p: p for p in PRESET_NAMES}),
    Option("k", "K: grad steps (DRaFT-K) or sparse steps (DRTune). 1 is best in the DRaFT paper and needs the "
           "least memory.", range=(1, 200, 1)),
    Option("lv_n", "DRaFT-LV: re-noised copies (n); the loss sums their rewards (the paper's Algorithm 2).",
           range=(1, 16, 1)),
    Option("steps", "Sampling steps per trajectory.", range=(1, 200, 1)),
    Option("cfg", "Classifier-free guidance inside the training trajectories.", range=(0.0, 30.0, 0.1)),
    Option("batch_size", "Trajectories per step; lower it if you run out of memory.", range=(1, 64, 1)),
    Option("lr", "AdamW learning rate of the LoRA.", name="learning_rate", flag="--lr", range=(1e-7, 1.0, 1e-5)),
    Option("rank", "LoRA rank.", range=(1, 256, 1)),
    Option("train_steps", "Optimiser steps.", name="training_steps", flag="--train-steps", range=(1, 100000, 1)),
    Option("save_every", "Checkpoint every N steps (0: only at the end).", range=(0, 100000, 1)),
    Option("seed", "Seeds noise, prompt order and method draws (private generator).", range=(0, 2**64 - 1, 1)),
    Option("heldout_every", "Score the held-out prompts every N steps (0: never).", range=(0, 100000, 1),
           ui="node-optional"),
    Option("early_stop_patience", "Stop after N held-out scores without improvement (0: never).", range=(0, 1000, 1),
           flag="--early-stop", ui="node-optional"),
    Option("k_min", "AlignProp: smallest K.", range=(1, 200, 1), ui="node-optional"),
    Option("k_max", "AlignProp: largest K (0: every step, the paper's uniform truncation).", range=(0, 200, 1),
           ui="node-optional"),
    Option("refl_first", "ReFL: first step m may be drawn from (-1: the last quarter of the chain).",
           range=(-1, 200, 1), ui="node-optional"),
    Option("refl_last", "ReFL: last step m may be drawn from (-1: the last step).", range=(-1, 200, 1),
           ui="node-optional"),
    Option("loss", "How the reward becomes a loss: −reward, or ReFL's hinge ReLU(cap − reward), which stops "
           "pushing once the reward reaches the cap.", choices={"negative reward": "negative",
                                                               "hinge (ReFL)": "hinge"}, ui="node-optional"),
    Option("reward_cap", "Hinge cap (ReFL: 2, in ImageReward units; pick it in your reward's units).",
           range=(-1000.0, 1000.0, 0.01), ui="node-optional"),
    Option("loss_scale", "Scale of the reward loss (ReFL 1e-3, AlignProp 0.01); with Adam it only matters through "
           "gradient clipping and the DRaFT+ penalty.", range=(1e-6, 1000.0, 1e-4), ui="node-optional"),
    Option("drtune_offset", "DRTune: a random start of the evenly spaced steps per trajectory (paper), or the fixed "
           "set that ends at the last step.", choices={"random": "random", "fixed": "fixed"}, ui="node-optional"),
    Option("lv_reduction", "DRaFT-LV: sum (paper) or mean of the n copies' rewards.",
           choices={"sum": "sum", "mean": "mean"}, ui="cli"),
    Option("kl_weight", "DRaFT+ ε-space L2 penalty to the frozen model (anti reward hacking; one extra forward per "
           "grad step).", range=(0.0, 1000.0, 0.01), ui="node-optional"),
    Option("weight_decay", "AdamW weight decay.", range=(0.0, 10.0, 0.01), ui="node-optional"),
    Option("max_grad_norm", "Gradient-norm clip (0: off).", range=(0.0, 1000.0, 0.1), ui="node-optional"),
    Option("grad_accum", "Micro-batches per optimiser step (larger effective batch).", range=(1, 256, 1),
           ui="node-optional"),
    Option("targets", "Layers that get a LoRA, the same on every model family: the attention projections, also the "
           "MLPs, or every layer of the blocks (never embeddings, norms or modulation).",
           choices={c: c for c in TARGET_CHOICES}, ui="node-optional"),
    Option("targets_regex", "Advanced: a regular expression on layer names that replaces 'targets' (for model "
           "families RewardLab does not know; the error for such a model lists its layer names).", ui="node-optional"),
    Option("precision", "Autocast dtype on CUDA (CPU always runs fp32).", choices={p: p for p in PRECISIONS},
           ui="node-optional"),
    Option("checkpointing", "Recompute the grad steps in backward, block by block inside the model in ComfyUI (far "
           "less memory: what lets SDXL, Flux and other large models train at full resolution; about 1.5-2x time).",
           ui="node-optional"),
    Option("alpha", "LoRA alpha (default: the rank, i.e. scale 1).", ui="cli", type=float),
    Option("compile_prefix", "torch.compile backend for the no-grad prefix (e.g. inductor).", ui="cli", type=str),
    Option("cuda_graphs", "Replay the no-grad prefix from CUDA graphs (with --compile-prefix inductor: its "
           "reduce-overhead mode). CUDA only.", ui="cli"),
)
BY_INPUT = {o.input_name: o for o in OPTIONS}


def config_from_options(values, **fixed):
    """A validated DraftConfig from user-facing option values (node inputs or parsed CLI arguments, by input name),
    plus config fields set directly in ``fixed`` (the sampler and scheduler, whose choices the host knows)."""
    unknown = sorted(set(values) - set(BY_INPUT))
    if unknown:
        raise ValueError(f"unknown DRaFT settings {unknown}; known: {sorted(BY_INPUT)}")
    for key, value in values.items():
        check_number(BY_INPUT[key], value)
    config = DraftConfig(**{BY_INPUT[k].field: BY_INPUT[k].to_config(v) for k, v in values.items()}, **fixed)
    config.validate()
    return config


def check_number(option, value):
    """A number must be finite and at least its range's minimum (the maximum is the node widget's; the command line
    may go beyond it). A ValueError names the input, the flag and the allowed minimum."""
    if option.range is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value) or value < option.range[0]:
        raise ValueError(f"{option.input_name} ({option.cli_flag}) must be a finite number >= {option.range[0]}, "
                         f"got {value}")


# --- the two user interfaces -----------------------------------------------------------------------------------

def node_inputs(optional=False):
    """ComfyUI V1 input specs (name -> (type, options)) of the node's required or optional options."""
    kinds = {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}
    out = {}
    for o in OPTIONS:
        if o.ui != ("node-optional" if optional else "node"):
            continue
        spec = {"default": o.default, "tooltip": o.help}
        if o.choices is not None:
            out[o.input_name] = (list(o.choices), spec)
            continue
        if o.range is not None:
            spec.update(min=o.range[0], max=o.range[1], step=o.range[2])
        out[o.input_name] = (kinds[o.value_type], spec)
    return out


def add_cli_arguments(parser):
    """One argparse argument per option (a boolean that defaults on becomes --no-<name>)."""
    for o in OPTIONS:
        dest = o.input_name
        if o.value_type is bool:
            flag = "--no-" + o.cli_flag[2:] if o.default else o.cli_flag
            parser.add_argument(flag, dest=dest, action="store_false" if o.default else "store_true", help=o.help)
        elif o.choices is not None:
            default = o.to_config(o.default) if o.cli_choices != list(o.choices) else o.default
            parser.add_argument(o.cli_flag, dest=dest, default=default, choices=o.cli_choices, help=o.help)
        else:
            parser.add_argument(o.cli_flag, dest=dest, type=o.value_type, default=o.default,
                                help=o.help + ("" if o.default is None else f" (default: {o.default})"))
    return parser


def cli_values(args):
    """The options' values from parsed CLI arguments (by input name)."""
    return {o.input_name: getattr(args, o.input_name) for o in OPTIONS}
