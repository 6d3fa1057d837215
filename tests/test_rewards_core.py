"""Reward library without model weights: preprocessing, protocol, weight-free rewards, losses, ensemble, safe
loading and the registry."""
import importlib
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from rewardlab.rewards import RewardWeightsError, registry
from rewardlab.rewards import simple
from rewardlab.rewards.base import Reward, normalize_prompts
from rewardlab.rewards.ensemble import RewardEnsemble
from rewardlab.rewards.losses import RENO_OFFSETS, RewardLoss, family, reward_loss, total_loss
from rewardlab.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from rewardlab.rewards.weights import load_into, read_state_dict, skip_init


def rand_images(b=2, h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


# --- preprocessing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(300, 500), (500, 301), (97, 150), (224, 224), (225, 640)])
def test_shortest_matches_torchvision_resize_and_centre_crop(hw):
    x = rand_images(1, *hw)
    ref = TF.center_crop(TF.resize(x, 224, TF.InterpolationMode.BICUBIC, antialias=True), [224, 224])
    ref = TF.normalize(ref.clamp(0, 1), OPENAI_MEAN, OPENAI_STD)
    assert torch.allclose(Preprocess()(x), ref, atol=1e-5)


@pytest.mark.parametrize("hw", [(300, 500), (500, 301), (97, 150), (224, 224)])
def test_longest_pad_matches_hps_resize_max_size(hw):
    x = rand_images(1, *hw)
    h, w = hw
    s = 224 / max(h, w)
    ref = x
    if s != 1:   # HPSv2 ResizeMaxSize on a tensor: round(dim * scale), bicubic, pad left/top = pad // 2 with 0
        nh, nw = round(h * s), round(w * s)
        ref = TF.pad(TF.resize(x, [nh, nw], TF.InterpolationMode.BICUBIC, antialias=True),
                     [(224 - nw) // 2, (224 - nh) // 2, 224 - nw - (224 - nw) // 2, 224 - nh - (224 - nh) // 2], fill=0)
    ref = TF.normalize(ref, OPENAI_MEAN, OPENAI_STD)
    ours = Preprocess(mode="longest_pad", clamp=False)(x)
    assert ours.shape == (1, 3, 224, 224) and torch.allclose(ours, ref, atol=1e-5)


def test_squash_and_pil_8bit_agreement():
    pil = Image.fromarray((np.random.default_rng(0).random((300, 500, 3)) * 80 + 90).astype(np.uint8)).filter(
        __import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(3))
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    ours = Preprocess(size=384, mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)(x)
    ref = TF.to_tensor(pil.resize((384, 384), Image.BICUBIC))[None] * 2 - 1
    assert (ours - ref).abs().mean() < 0.004    # 8-bit rounding of PIL's output, in normalised units


def test_preprocessing_is_differentiable_fp32_and_antialiased():
    x = rand_images(2, 300, 500).half().requires_grad_(True)
    y = Preprocess()(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x = rand_images(1, 448, 448)
    aliased = Preprocess(antialias=False)(x)
    assert (aliased - Preprocess()(x)).abs().mean() > 0.05      # noise is averaged away only with antialias


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="shortest"):
        Preprocess(mode="crop")


# --- protocol ---------------------------------------------------------------------------------------------------

def test_prompts_are_broadcast_or_checked():
    assert normalize_prompts("a", 3, True) == ["a"] * 3
    assert normalize_prompts(["a"], 2, True) == ["a", "a"]
    assert normalize_prompts(["a", "b"], 2, True) == ["a", "b"]
    assert normalize_prompts(None, 2, False) == ["", ""]
    with pytest.raises(ValueError, match="one prompt per image"):
        normalize_prompts(["a", "b", "c"], 2, True)
    with pytest.raises(ValueError, match="give a prompt"):
        normalize_prompts(["", " "], 2, True, "hps")


def test_reward_checks_images_and_stays_frozen_in_eval():
    r = registry.build_reward("brightness")
    with pytest.raises(ValueError, match="movedim"):
        r(torch.rand(2, 8, 8, 3))          # BHWC by mistake
    with pytest.raises(ValueError, match="uint8"):
        r(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    parent = torch.nn.Sequential(r).train()
    assert not r.training and isinstance(r, Reward)


# --- weight-free rewards: closed forms, computed independently with numpy -------------------------------------------

def np_img(x):
    return x[0].permute(1, 2, 0).double().numpy()


def test_weight_free_rewards_match_closed_forms():
    x = rand_images(1, 24, 40, seed=3)
    a = np_img(x)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    mx, mn = a.max(-1), a.min(-1)
    rg, yb = r - g, 0.5 * (r + g) - b
    hue = math.radians(200.0)
    h = np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)
    chroma = np.hypot(2 * r - g - b, math.sqrt(3) * (g - b)) / 2
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
    expected = {
        "saturation": ((mx - mn) / mx).mean(),
        "brightness": y.mean(),
        "colourfulness": math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()),
        "target-colour": 1 - np.linalg.norm(a - np.array([0.2, 0.5, 0.9]), axis=-1).mean() / math.sqrt(3),
        "target-hue": (chroma * np.cos(h - hue)).mean(),
        "sharpness": lap.var(),
    }
    configs = {"target-colour": {"colour": (0.2, 0.5, 0.9)}, "target-hue": {"hue_degrees": 200.0}}
    for name, value in expected.items():
        got = registry.build_reward(name, config=configs.get(name))(x).item()
        assert got == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert registry.build_reward("brightness", config={"target": 0.3})(x).item() == pytest.approx(-abs(y.mean() - 0.3), abs=1e-6)


def test_target_hue_and_colour_extremes():
    red, cyan, grey = (torch.tensor(c).view(1, 3, 1, 1).expand(1, 3, 8, 8) for c in
                       ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0), (0.5, 0.5, 0.5)))
    hue = registry.build_reward("target-hue", config={"hue_degrees": 0.0})
    assert hue(red).item() == pytest.approx(1.0, abs=1e-6)
    assert hue(cyan).item() == pytest.approx(-1.0, abs=1e-6)
    assert hue(grey).item() == pytest.approx(0.0, abs=1e-6)
    colour = registry.build_reward("target-colour", config={"colour": (1.0, 0.0, 0.0)})
    assert colour(red).item() == pytest.approx(1.0, abs=1e-3) and colour(cyan).item() == pytest.approx(0.0, abs=1e-3)


def test_jpeg_proxy_dct_and_tables_are_the_standard_ones():
    d = simple.dct_matrix().double()
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64), atol=1e-6)     # orthonormal
    v = torch.rand(8, dtype=torch.float64)
    n = torch.arange(8, dtype=torch.float64)
    ref = torch.stack([(v * torch.cos(math.pi * (2 * n + 1) * k / 16)).sum() * (math.sqrt(1 / 8) if k == 0 else 0.5)
                       for k in range(8)])
    assert torch.allclose(d @ v, ref, atol=1e-6)
    assert simple.quant_table(simple._Q_LUMA, 50)[0, 0] == 16 and simple.quant_table(simple._Q_LUMA, 95)[0, 0] == 2
    assert simple.quant_table(simple._Q_CHROMA, 95)[7, 7] == 10


def test_jpeg_proxy_ranks_images_like_real_jpeg_size():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.4)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), (64, 64), mode="bicubic").clamp(0, 1)
    medium = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), (64, 64), mode="bilinear")
    noisy = torch.rand(1, 3, 64, 64, generator=g)
    images = [flat, smooth, medium, noisy]

    def jpeg_size(x):
        buf = io.BytesIO()
        Image.fromarray((np_img(x) * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=95)
        return buf.tell()

    proxy = registry.build_reward("jpeg-incompressibility")
    bits = [proxy(x).item() for x in images]
    sizes = [jpeg_size(x) for x in images]
    assert np.argsort(bits).tolist() == np.argsort(sizes).tolist() == [0, 1, 2, 3]
    assert registry.build_reward("jpeg-compressibility")(noisy).item() == pytest.approx(-bits[3])


@pytest.mark.parametrize("name", ["saturation", "brightness", "colourfulness", "target-colour", "target-hue",
                                  "sharpness", "jpeg-compressibility", "jpeg-incompressibility"])
def test_gradient_ascent_on_pixels_raises_weight_free_reward(name):
    reward = registry.build_reward(name)
    x = (rand_images(2, 32, 32, seed=1) * 0.5 + 0.25).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.02)
    start = reward(x).detach()
    for _ in range(5):
        opt.zero_grad()
        (-reward(x).sum()).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        opt.step()
    assert (reward(x.detach()) > start).all(), name


# --- losses and ensembles -----------------------------------------------------------------------------------------

def test_loss_forms():
    r = torch.tensor([0.5, 2.5])
    assert torch.equal(reward_loss(r), -r)
    assert torch.allclose(reward_loss(r, "target", 2.0), torch.tensor([1.5, 0.5]))
    assert torch.allclose(reward_loss(r, "hinge", 2.0, weight=3.0), torch.tensor([4.5, 0.0]))
    assert torch.allclose(reward_loss(r, "offset", 1.0), torch.tensor([0.5, -1.5]))
    with pytest.raises(ValueError, match="needs a value"):
        reward_loss(r, "hinge")
    with pytest.raises(ValueError, match="unknown loss form"):
        reward_loss(r, "square")
    assert family("hps-v2.1") == "hps" and family("clipscore-vit-h-14") == "clipscore"
    assert RENO_OFFSETS["pickscore"] == 30.0 and RENO_OFFSETS["imagereward"] == 2.0


def test_reno_loss_and_total_loss():
    x = rand_images(2)
    bright = registry.build_reward("brightness")
    bright.name = "hps-standin"           # ReNO's table is looked up by family name
    term = RewardLoss.reno(bright)
    loss, r = term(x)
    assert term.weight == 5.0 and torch.allclose(loss, 5.0 * (1.0 - r))
    sat = registry.build_reward("saturation")
    total, parts = total_loss([term, RewardLoss(sat, "target", 1.0, 2.0)], x)
    assert torch.allclose(total, 5 * (1 - parts["hps-standin"]) + 2 * (1 - parts["saturation"]).abs())
    with pytest.raises(ValueError, match="ReNO defines no offset"):
        RewardLoss.reno(sat)


def test_ensemble_weights_and_normalisations():
    x = rand_images(4, seed=2)
    a, b = registry.build_reward("brightness"), registry.build_reward("colourfulness")
    ra, rb = a(x), b(x)
    plain = RewardEnsemble([a, b], [2.0, -0.5])
    assert torch.allclose(plain(x), 2 * ra - 0.5 * rb) and not plain.needs_text
    ranged = RewardEnsemble([a, b], [1.0, 1.0], "range")
    lo, hi = b.score_range
    assert torch.allclose(ranged(x), ra + (rb - lo) / (hi - lo))
    running = RewardEnsemble([a, b], normalise="running")
    out = running(x)
    za, zb = ((s - s.mean()) / s.std(unbiased=False) for s in (ra, rb))
    assert torch.allclose(out, za + zb, atol=1e-4)
    assert set(running.last_components) == {"0:brightness", "1:colourfulness"}
    with pytest.raises(ValueError, match="weights"):
        RewardEnsemble([a, b], [1.0])


def test_ensemble_running_stats_survive_inference_mode_then_backward():
    a, b = registry.build_reward("brightness"), registry.build_reward("saturation")
    ens = RewardEnsemble([a, b], normalise="running")
    with torch.inference_mode():
        ens(rand_images(3))                # ComfyUI scores in inference mode first
    x = rand_images(3, seed=5).requires_grad_(True)
    ens(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and int(ens.seen) == 2


# --- safe loading ---------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this would call os.system; weights_only loading must refuse before that happens."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused(tmp_path, monkeypatch, fmt):
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"weight": torch.zeros(2), "bias": _Payload()}}
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    calls = []
    # os.system pickles as posix.system (nt.system on Windows); patch where unpickling looks it up.
    monkeypatch.setattr(importlib.import_module(os.system.__module__), "system", lambda cmd: calls.append(cmd) or 0)
    with pytest.raises(RewardWeightsError, match="refused to load") as err:
        read_state_dict(str(path), "hps-v2.1", "{'state_dict': ...}")
    assert "hps-v2.1" in str(err.value) and "safetensors" in str(err.value)
    assert calls == []                      # the payload never ran
    # Sanity: an unrestricted load of the same file does run the (harmless, patched) payload.
    torch.load(path, weights_only=False) if fmt == "torch.save" else pickle.loads(path.read_bytes())
    assert calls == ["echo pwned > /dev/null"]


class NeedsAClass:
    pass


def test_a_pickle_needing_a_class_names_it_without_colour_codes_or_torch_advice(tmp_path):
    """Issue 14: the message kept torch's raw ANSI codes and its weights_only=False advice, and lost the class."""
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "model": NeedsAClass()}, path)
    with pytest.raises(RewardWeightsError) as err:
        read_state_dict(str(path), "hps-v2.1", "{'state_dict': ...}")
    msg = str(err.value)
    assert f"needs the Python class or function '{__name__}.NeedsAClass' to load" in msg
    assert "\x1b" not in msg and "weights_only" not in msg and "if you trust" not in msg and "\n" not in msg
    assert "convert the file once, in a trusted environment, to .safetensors" in msg


def test_tiny_images_are_a_clear_error_for_rewards_that_need_a_minimum_size():
    """Issue 14: sharpness on a 1x1 or 2x2 image failed inside conv2d."""
    sharp = registry.load_reward("sharpness", "cpu")
    for size in (1, 2, 3):
        with pytest.raises(ValueError, match=f"{size}x{size} pixels are too small for this reward \\(at least 4x4\\)"):
            sharp(torch.rand(1, 3, size, size))
    assert torch.isfinite(sharp(torch.rand(2, 3, 4, 4))).all()
    for name in registry.list_rewards(weight_free=True):         # every other weight-free reward scores 1x1 images
        if name != "sharpness":
            assert torch.isfinite(registry.load_reward(name, "cpu")(torch.rand(2, 3, 1, 1))).all(), name


def test_state_dict_unwrapping_and_clear_mismatch_errors(tmp_path):
    head = torch.nn.Linear(8, 1)
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in head.state_dict().items()}}, tmp_path / "h.pt")
    state = read_state_dict(str(tmp_path / "h.pt"), "m")
    assert set(state) == {"weight", "bias"}
    target = torch.nn.Linear(8, 1)
    load_into(target, state, "m")
    assert torch.allclose(target.weight, head.weight, atol=1e-3) and target.weight.dtype == torch.float32
    with pytest.raises(RewardWeightsError, match=r"aesthetic-v1.*shape mismatches.*Expected keys: weight \(1, 16\)"):
        load_into(torch.nn.Linear(16, 1), state, "aesthetic-v1")
    with pytest.raises(RewardWeightsError, match=r"missing keys.*unexpected keys"):
        load_into(torch.nn.Sequential(torch.nn.Linear(8, 1)), state, "aesthetic-v2")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(RewardWeightsError, match="bad.safetensors is not a readable safetensors"):
        read_state_dict(str(tmp_path / "bad.safetensors"), "hps-v2.1")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "h.pt").read_bytes()[:40])
    with pytest.raises(RewardWeightsError, match="not a readable PyTorch checkpoint"):
        read_state_dict(str(tmp_path / "trunc.pt"), "hps-v2.1")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(RewardWeightsError, match="unsupported weight file"):
        read_state_dict(str(tmp_path / "w.npz"), "x")


def test_skip_init_is_temporary_and_strict_loading_fills_every_parameter():
    before = torch.nn.init.kaiming_uniform_
    ref = torch.nn.Linear(4, 3)
    with skip_init():
        assert torch.nn.init.kaiming_uniform_ is not before
        fast = torch.nn.Linear(4, 3)
    assert torch.nn.init.kaiming_uniform_ is before
    load_into(fast, ref.state_dict(), "m")
    assert torch.equal(fast.weight, ref.weight) and torch.equal(fast.bias, ref.bias)


# --- registry -------------------------------------------------------------------------------------------------------

def _tiny_linear_loader(name, config, files):
    reward = registry.build_reward("brightness")
    reward.head = torch.nn.Linear(3, 1)
    if files:
        load_into(reward.head, read_state_dict(files["weights"], name), name)
    return reward


@pytest.fixture
def tiny_spec(monkeypatch):
    import sys
    # A registry entry whose loader lives in this test module (loaders are "module:function" relative names).
    monkeypatch.setitem(sys.modules, "rewardlab.rewards._test_loader", sys.modules[__name__])
    spec = registry.register(registry.RewardSpec(
        "test-tiny", "_test_loader:_tiny_linear_loader", {},
        (registry.WeightFile("weights", ("tiny.safetensors", "tiny.pt"), layout="Linear(3, 1)", hf=("org/repo", "tiny.pt")),)))
    yield spec
    registry.unload("test-tiny")
    registry._SPECS.pop("test-tiny", None)


def test_registry_resolves_local_files_caches_and_unloads(tmp_path, tiny_spec, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.delenv("REWARDLAB_MODELS", raising=False)
    sub = tmp_path / "test-tiny"
    sub.mkdir()
    save_file(torch.nn.Linear(3, 1).state_dict(), str(sub / "tiny.safetensors"))
    assert registry.resolve_files("test-tiny", str(tmp_path)) == {"weights": str(sub / "tiny.safetensors")}
    with torch.inference_mode():           # ComfyUI runs nodes in inference mode
        a = registry.load_reward("test-tiny", "cpu", folder=str(tmp_path))
    assert not a.head.weight.is_inference() and not a.head.weight.requires_grad
    assert registry.load_reward("test-tiny", "cpu", folder=str(tmp_path)) is a
    assert registry.load_reward("test-tiny", "cpu", torch.float64, folder=str(tmp_path)) is not a
    assert ("test-tiny", "cpu", "torch.float32") in registry.cached()
    assert registry.unload("test-tiny") == 2 and not any(k[0] == "test-tiny" for k in registry.cached())


def test_registry_never_downloads_unless_enabled(tmp_path, tiny_spec, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append((a, k)) or str(tmp_path / "x"))
    monkeypatch.delenv("REWARDLAB_MODELS", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        registry.resolve_files("test-tiny", str(tmp_path))
    msg = str(err.value)
    assert "tiny.safetensors" in msg and str(tmp_path) in msg and "allow download" in msg and "org/repo" in msg
    assert calls == []
    registry.resolve_files("test-tiny", str(tmp_path), allow_download=True)
    assert calls and calls[0][0] == ("org/repo", "tiny.pt") and calls[0][1]["local_dir"] == str(tmp_path / "test-tiny")


def test_registry_lists_all_models_and_rejects_unknown_names():
    names = registry.list_rewards()
    for n in ("aesthetic-v2", "aesthetic-v1", "hps-v2.1", "hps-v2", "clipscore-vit-h-14", "imagereward", "pickscore",
              "saturation", "jpeg-compressibility"):
        assert n in names
    assert "saturation" in registry.list_rewards(weight_free=True) and "hps-v2" not in registry.list_rewards(weight_free=True)
    with pytest.raises(ValueError, match="unknown reward model"):
        registry.get_spec("nope")
