"""The tiny model's built-in text encoder: a closed word vocabulary, token + position embeddings and one
transformer layer, giving ``encoder_hidden_states`` (B, L, D) for the UNet's cross-attention.

It is trained together with the UNet, so it needs no download. The empty prompt is the unconditional
input (it becomes all padding), which is what caption dropout trains and what classifier-free guidance uses.
"""
import re

import torch
from torch import nn

from .data import COLOR_NAMES, SHAPES

PAD, UNK = "<pad>", "<unk>"
GRAMMAR_WORDS = ("a", "an", "the", "on", "in", "with", "and", "background", *SHAPES, *COLOR_NAMES)
VOCAB = (PAD, UNK, *GRAMMAR_WORDS)


def words(prompt):
    """Lower-case words of a prompt (punctuation and extra spaces ignored)."""
    return re.findall(r"[a-z<>]+", prompt.lower())


class Tokenizer:
    """Word-level: known words to their id, anything else to <unk>, padded/truncated to ``max_length``."""

    def __init__(self, vocab=VOCAB, max_length=16):
        self.vocab = tuple(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    def __call__(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for prompt in prompts:
            ids = [self.ids.get(w, self.ids[UNK]) for w in words(prompt) if w != PAD][: self.max_length]
            rows.append(ids + [self.ids[PAD]] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids.tolist() if self.vocab[i] != PAD)


class TinyTextEncoder(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, dim). No attention mask: padding positions carry learned
    embeddings too, so the all-padding (empty) prompt has a well-defined, trained embedding."""

    def __init__(self, vocab_size=len(VOCAB), max_length=16, dim=64, layers=1, heads=4):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, max_length=max_length, dim=dim, layers=layers, heads=heads)
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tokens.weight, std=0.02)

    @property
    def dim(self):
        return self.config["dim"]

    def forward(self, ids):
        return self.norm(self.layers(self.tokens(ids) + self.positions[: ids.shape[1]]))
