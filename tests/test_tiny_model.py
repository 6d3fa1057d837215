"""The embedded tiny model: its data, text encoder, shipped weights (recognisable samples), training step, CLI."""
import os

import pytest
import torch

from rewardlab.tiny import data
from rewardlab.tiny.text import PAD, UNK, VOCAB, Tokenizer, TinyTextEncoder

# Measured on the shipped 4000-step weights: 1.00 shape colour, 1.00 background and 1.00 shape over all 120
# captions (tiny_model.json "eval"), and on this test's 24 captions; chance is 1/6 for colours, 1/4 for shape.
# The thresholds leave margin for other torch builds.
MIN_COLOR_ACCURACY = 0.8
MIN_SHAPE_ACCURACY = 0.7


@pytest.fixture(scope="session")
def tiny():
    from rewardlab.tiny.model import load_tiny
    return load_tiny()


@pytest.fixture(scope="session")
def eval_captions():
    """24 captions: every shape × colour once, the background cycling so every colour is also a background."""
    k = len(data.COLOR_NAMES)
    out = []
    for s, shape in enumerate(data.SHAPES):
        for c, color in enumerate(data.COLOR_NAMES):
            background = data.COLOR_NAMES[(c + 1 + (s + c) % (k - 1)) % k]
            out.append(data.caption(shape, color, background))
    return out


@pytest.fixture(scope="session")
def generated(tiny, eval_captions):
    return tiny.generate(eval_captions, steps=12, cfg=3.0, seed=0)


def labels_of(captions):
    words = [c.split() for c in captions]
    return (torch.tensor([data.SHAPES.index(w[2]) for w in words]),
            torch.tensor([data.COLOR_NAMES.index(w[1]) for w in words]),
            torch.tensor([data.COLOR_NAMES.index(w[-2]) for w in words]))


# ---- data ----

def test_data_is_deterministic_and_matches_captions():
    a, b = data.make_dataset(16, seed=3), data.make_dataset(16, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, data.make_dataset(16, seed=4).images)
    assert a.images.shape == (16, 3, 32, 32) and a.images.min() >= 0 and a.images.max() <= 1
    assert (a.color != a.background).all()
    shape, color, background = labels_of(a.captions)
    assert torch.equal(shape, a.shape) and torch.equal(color, a.color) and torch.equal(background, a.background)


def test_classifier_is_exact_on_clean_data():
    batch = data.make_dataset(96, seed=11)
    shape, color, background = data.classify(batch.images)
    assert torch.equal(shape, batch.shape)
    assert torch.equal(color, batch.color)
    assert torch.equal(background, batch.background)


# ---- text encoder ----

def test_tokenizer_maps_unknown_words_to_unk_and_pads():
    tok = Tokenizer(max_length=8)
    ids = tok(["a purple circle on a red background!", ""])
    assert ids.shape == (2, 8)
    assert ids[0, 1] == VOCAB.index(UNK)
    assert tok.decode(ids[0]) == "a <unk> circle on a red background"
    assert (ids[1] == VOCAB.index(PAD)).all()
    assert tok("A RED   Circle").tolist() == tok("a red circle").tolist()
    assert tok(" ".join(["red"] * 20)).shape == (1, 8)          # truncated, not an error


def test_text_encoder_shapes_and_unknown_word_embedding(tiny):
    enc = TinyTextEncoder(dim=32, max_length=8)
    assert enc(Tokenizer(max_length=8)(["a red circle", "x"])).shape == (2, 8, 32)
    a = tiny.encode(["a purple circle on a red background"])["encoder_hidden_states"]
    b = tiny.encode(["a zzz circle on a red background"])["encoder_hidden_states"]
    c = tiny.encode(["a blue circle on a red background"])["encoder_hidden_states"]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert tiny.encode("")["encoder_hidden_states"].shape == a.shape


# ---- shipped weights ----

def test_shipped_files_are_small_and_load(tiny):
    from rewardlab.tiny.model import CONFIG, WEIGHTS
    assert WEIGHTS.stat().st_size <= 10 * 2**20
    assert CONFIG.exists()
    assert tiny.model_sigmas.shape == (1000,) and tiny.model_sigmas[-1] > 100    # linear DDPM betas
    assert not any(p.requires_grad for p in tiny.parameters())


def test_samples_are_recognisable(generated, eval_captions):
    shape, color, background = labels_of(eval_captions)
    got_shape, got_color, got_background = data.classify(generated)
    acc_color = (got_color == color).float().mean().item()
    acc_background = (got_background == background).float().mean().item()
    acc_shape = (got_shape == shape).float().mean().item()
    print(f"tiny model accuracy: shape colour {acc_color:.2f}, background {acc_background:.2f}, shape {acc_shape:.2f}")
    assert acc_background >= MIN_COLOR_ACCURACY
    assert acc_color >= MIN_COLOR_ACCURACY
    assert acc_shape >= MIN_SHAPE_ACCURACY


def test_generate_is_seeded_and_in_range(tiny, generated, eval_captions):
    assert generated.shape == (len(eval_captions), 3, 32, 32)
    assert generated.min() >= 0 and generated.max() <= 1
    again = tiny.generate(eval_captions[:2], steps=12, cfg=3.0, seed=0)
    other = tiny.generate(eval_captions[:2], steps=12, cfg=3.0, seed=1)
    torch.testing.assert_close(again, generated[:2], atol=1e-5, rtol=0)
    assert (again - other).abs().mean() > 1e-3


def test_decode_is_differentiable(tiny):
    x = torch.zeros(1, 3, 4, 4, requires_grad=True)
    tiny.decode(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))


# ---- training ----

TINY_UNET = dict(sample_size=8, in_channels=48, out_channels=48, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
TINY_TEXT = dict(vocab_size=len(VOCAB), max_length=8, dim=16, layers=1, heads=2)


TRAIN_KW = dict(steps=2, batch_size=4, threads=0, unet_config=TINY_UNET, text_config=TINY_TEXT, log=None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from rewardlab.tiny.train import train
    out = tmp_path_factory.mktemp("tiny")
    return out, train(out, **TRAIN_KW)


def test_training_step_is_finite_saves_and_reloads(trained):
    from rewardlab.tiny.model import load_tiny
    out, result = trained
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    loaded = load_tiny(path=out)
    images = loaded.generate(["a red circle on a blue background"], steps=2, cfg=2.0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    # The saved EMA weights are the returned model's weights (fp16 storage).
    for name, p in result["model"].unet.named_parameters():
        torch.testing.assert_close(loaded.unet.get_parameter(name), p.half().float())


def test_training_is_reproducible(trained):
    from rewardlab.tiny.train import train
    assert train(**TRAIN_KW)["losses"] == trained[1]["losses"]


# ---- CLI ----

def test_cli_demo_writes_pngs(tmp_path, capsys):
    from PIL import Image
    from rewardlab.cli import main
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--captions", "a red circle on a blue background",
          "a white cross on a green background", "--per-caption", "2", "--steps", "3", "--train-steps", "0"])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["captions.txt", "grid.png", "sample_000.png", "sample_001.png", "sample_002.png",
                     "sample_003.png"]
    assert Image.open(out / "sample_000.png").size == (128, 128)
    assert "grid.png" in capsys.readouterr().out
    assert (out / "captions.txt").read_text().splitlines()[3].endswith("a white cross on a green background")
