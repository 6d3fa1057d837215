"""Gradients through a real ComfyUI MODEL + VAE, and LoRA files that stock LoraLoader reads (in-process, CPU)."""
import logging

import pytest
import safetensors.torch
import torch

from rewardlab.host.bridge import trajectory
from rewardlab.host.grad import (apply_lora_state_dict, checkpoint_blocks, grad_enabled, grad_ready,
                                 load_for_training, lora_patcher, release)
from rewardlab.host.models import calculate_sigmas
from rewardlab.host.vae import decode, grad_vae
from rewardlab.samplers.runner import Policy
from rewardlab.training.lora import kohya_key, lora_state_dict

CFG = 3.0


def _latent():
    return {"samples": torch.zeros(1, 4, 8, 8)}


def _noise(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _stock_euler(comfy, model, conds, steps=2, seed=3):
    with torch.inference_mode():
        return comfy.KSampler().sample(model, seed, steps, CFG, "euler", "normal", conds[0], conds[1], _latent())[0]["samples"]


def _redness(img):
    """A toy differentiable reward on a BCHW image in [0, 1]."""
    return img[:, 0].mean() - 0.5 * img[:, 1:].mean()


def test_loaded_weights_are_inference_tensors(unet, vae):
    # the premise of the whole bridge: without grad_ready, backward through these weights fails
    assert next(unet.model.diffusion_model.parameters()).is_inference()
    assert next(vae.first_stage_model.parameters()).is_inference()


def _reward_grads(unet, vae, conds, checkpoint, blocks=False):
    """One DRaFT/ReNO-style backward: reward(decode(trajectory)) -> LoRA and noise gradients."""
    sigmas = calculate_sigmas(unet, "normal", 3)
    noise = _noise().requires_grad_(True)
    torch.manual_seed(0)                                      # same LoRA init in every call
    with torch.inference_mode(), grad_enabled():            # as inside a node
        mp, adapters = lora_patcher(unet, rank=2)
        if blocks:
            checkpoint_blocks(mp)
        vp = grad_vae(vae)
        load_for_training(mp, vp)
        def backward(x):            # inside the guider: checkpointed steps are recomputed here
            img = decode(vae, x, patcher=vp)
            assert img.shape == (1, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
            _redness(img).backward()

        try:
            trajectory(mp, conds[0], conds[1], CFG, sigmas, noise, _latent(), policy=Policy.all(checkpoint=checkpoint),
                       then=backward)
        finally:
            release(mp, vp)
    assert vp.model.decoder.conv_in.weight.grad is None       # base weights stay frozen
    return adapters, noise.grad


def test_reward_gradient_reaches_lora_and_noise_through_vae_and_unet(comfy, unet, vae, conds):
    adapters, noise_grad = _reward_grads(unet, vae, conds, checkpoint=False)
    # q, k, v, out of attn1 + attn2 in each of the 4 transformers (input, middle, 2 output blocks)
    assert len(adapters) == 8 * 4
    assert all(n.startswith(("input_blocks", "middle_block", "output_blocks")) for n in adapters)
    for name, a in adapters.items():            # up starts at 0, so dR/d(up) = g·downᵀ is the live gradient
        assert a.up.grad is not None and torch.isfinite(a.up.grad).all() and a.up.grad.abs().sum() > 0, name
    assert noise_grad.abs().sum() > 0

    # checkpointed steps are recomputed in backward (inside the guider call), and with the model's blocks
    # checkpointed too (nested in the step's recomputation): same gradients
    for blocks in (False, True):
        ckpt_adapters, ckpt_noise_grad = _reward_grads(unet, vae, conds, checkpoint=True, blocks=blocks)
        for name, a in adapters.items():
            torch.testing.assert_close(ckpt_adapters[name].up.grad, a.up.grad, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(ckpt_noise_grad, noise_grad, rtol=1e-4, atol=1e-8)


def test_training_leaves_the_users_model_untouched(comfy, unet, vae, conds):
    before = _stock_euler(comfy, unet, conds)
    with torch.inference_mode(), grad_enabled():
        mp, adapters = lora_patcher(unet, rank=2)
        with torch.no_grad():
            for a in adapters.values():
                a.up.normal_(0, 0.5)                 # a trained, non-zero LoRA
        x = trajectory(mp, conds[0], conds[1], CFG, calculate_sigmas(mp, "normal", 2), _noise(), _latent(),
                          policy=Policy.last(1))
        x.sum().backward()
        release(mp)
    assert (_stock_euler(comfy, unet, conds) - before).abs().max() == 0


def test_saved_lora_loads_through_stock_loader_with_every_key(comfy, unet, conds, model_files, caplog):
    """Conv and linear layers (targets=None): the file from lora_state_dict loads through stock
    LoraLoaderModelOnly with no 'lora key not loaded', patches exactly our layers, and samples as our wrappers do."""
    with torch.inference_mode(), grad_enabled():
        mp, adapters = lora_patcher(unet, rank=4, alpha=2.0, targets=None)
        with torch.no_grad():
            for a in adapters.values():
                a.up.normal_(0, 0.3)
    sd = lora_state_dict(adapters)
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert any(a.down.shape[1] != a.shape[1] for a in adapters.values())      # some conv (r, in·k·k) entries
    safetensors.torch.save_file(sd, str(model_files / "loras" / "bridge_test.safetensors"))

    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        loaded = comfy.LoraLoaderModelOnly().load_lora_model_only(unet, "bridge_test.safetensors", 1.0)[0]
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert set(loaded.patches) == {f"diffusion_model.{n}.weight" for n in adapters}
    # the A1111/kohya spelling (lora_unet_<ldm name with underscores>) maps onto the same layers
    kohya = comfy_lora_patches(unet, lora_state_dict(adapters, key=kohya_key))
    assert "lora key not loaded" not in caplog.text and kohya == set(loaded.patches)

    stock = _stock_euler(comfy, loaded, conds)
    with torch.no_grad():
        from comfy.sample import prepare_noise
        noise = prepare_noise(torch.zeros(1, 4, 8, 8), 3)
        ours = trajectory(mp, conds[0], conds[1], CFG, calculate_sigmas(mp, "normal", 2), noise, _latent(), seed=3)
    release(mp)
    assert (stock - _stock_euler(comfy, unet, conds)).abs().max() > 1e-2      # the LoRA changes the sample
    assert (stock - ours).abs().max() <= 1e-4                                   # and means the same in both hosts
    half = apply_lora_state_dict(unet, sd, 0.5)
    assert set(half.patches) == set(loaded.patches) and (_stock_euler(comfy, half, conds) - stock).abs().max() > 1e-3


def comfy_lora_patches(model, sd):
    with torch.inference_mode():
        return set(apply_lora_state_dict(model, sd).patches)


def test_grad_ready_rejects_unknown_wrapper_keys(comfy, unet):
    with pytest.raises(ValueError, match="does not have"):
        grad_ready(unet, {"diffusion_model.nope.weight": lambda t: t})
    with pytest.raises(ValueError, match="matches LoRA targets"):
        lora_patcher(unet, targets=("no_such_layer",))


def test_decode_values_match_stock_vae_decode_and_straight_through_keeps_gradient(comfy, vae):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 4
    with torch.inference_mode():
        stock = vae.decode(latent)                                        # BHWC, clamped
    with torch.no_grad():
        hard = decode(vae, latent, clamp="hard")
    assert hard.shape == (1, 3, 64, 64) and (hard.movedim(1, -1) - stock).abs().max() <= 1e-5
    with torch.inference_mode(), grad_enabled():
        vp = grad_vae(vae)
        grads, values = {}, {}
        for clamp in ("straight_through", "hard", "none"):
            z = latent.clone().requires_grad_(True)
            img = decode(vae, z, patcher=vp, clamp=clamp)
            img.sum().backward()
            grads[clamp], values[clamp] = z.grad, img.detach()
        release(vp)
    saturated = (values["none"] < 0) | (values["none"] > 1)
    assert saturated.any() and not saturated.all()                         # the case the choice is about
    torch.testing.assert_close(values["straight_through"], values["hard"])    # same pixels as stock
    torch.testing.assert_close(grads["straight_through"], grads["none"])      # gradient of the unclamped map
    assert (grads["hard"] - grads["none"]).abs().max() > 0                     # the clamp would have cut some


def test_tiled_decode_matches_untiled_and_carries_gradient(comfy, vae):
    """A 16x16 latent decoded in 8x8 tiles (overlap 2) against the one-piece decode: as close to it as ComfyUI's own
    tiled decode with the same tiles (the decoder's group norms see one tile at a time in both), and the gradient
    reaches every tile."""
    from rewardlab.host.vae import decode, grad_vae
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        stock_whole = vae.decode(latent).movedim(-1, 1)
        stock_tiled = vae.decode_tiled(latent, tile_x=8, tile_y=8, overlap=2).movedim(-1, 1)
    with torch.inference_mode(), grad_enabled():
        vp = grad_vae(vae)
        whole = decode(vae, latent, patcher=vp).detach()
        z = latent.clone().requires_grad_(True)
        tiled = decode(vae, z, patcher=vp, tile=64)          # 64 image pixels = 8 latent pixels, overlap 2
        tiled[:, 0].mean().backward()
        release(vp)
    assert tiled.shape == whole.shape == (1, 3, 128, 128)
    assert (whole - stock_whole).abs().max() <= 1e-5
    ours, stocks = (tiled.detach() - whole).abs().mean(), (stock_tiled - stock_whole).abs().mean()
    assert 0 < ours <= 1.5 * stocks, (float(ours), float(stocks))
    grad = z.grad.abs().sum(1)[0]
    assert (grad[:8, :8].sum() > 0) and (grad[8:, 8:].sum() > 0)         # every corner tile passes gradient
