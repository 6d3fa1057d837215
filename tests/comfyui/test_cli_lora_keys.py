"""LoRA files of `rewardlab train --model` (diffusers SDXL, SD3, Flux folders) against ComfyUI's own LoRA key map:
``comfy.lora.model_lora_keys_unet`` on a model of the family's ComfyUI class, then ``comfy.lora.load_lora`` with
the written keys, for each targets choice. Every key must load ("lora key not loaded" never logged) and every
module must become one patch. The model objects carry only what the key map reads (class and unet_config), so no
full-width SDXL/Flux weights are built; the unet_config mirrors the tiny diffusers model of tests/_pipeline_fixtures.py.
"""
import logging
import os
import sys
from types import SimpleNamespace

import pytest

from rewardlab.training.lora import lora_state_dict
from rewardlab.training.pipelines import diffusers_bundle

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from _pipeline_fixtures import WRITERS  # noqa: E402


def unet_config(unet):
    """ComfyUI's ldm unet_config fields that ``unet_to_diffusers`` reads, for a diffusers UNet2DConditionModel."""
    c = unet.config
    n = c.layers_per_block
    attention = [1 if "CrossAttn" in t else 0 for t in c.down_block_types]
    return {"num_res_blocks": [n] * len(attention), "channel_mult": list(range(1, len(attention) + 1)),
            "transformer_depth": [d for d in attention for _ in range(n)],
            "transformer_depth_output": [d for d in attention for _ in range(n + 1)], "transformer_depth_middle": 1}


def comfy_model(family, bundle):
    import comfy.model_base as mb

    net = bundle.lora_root
    cls, config = {
        "SDXL": lambda: (mb.SDXL, unet_config(net)),
        "SD3": lambda: (mb.SD3, {"depth": net.config.num_layers}),
        "Flux": lambda: (mb.Flux, {"depth": net.config.num_layers, "depth_single_blocks": net.config.num_single_layers,
                                   "hidden_size": net.config.num_attention_heads * net.config.attention_head_dim}),
    }[family]()
    model = cls.__new__(cls)           # only what model_lora_keys_unet reads: the class and its unet_config
    object.__setattr__(model, "model_config", SimpleNamespace(unet_config=config))
    object.__setattr__(model, "state_dict", lambda: {})
    return model


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
@pytest.mark.parametrize("targets", ["attention", "attention + feed-forward"])
def test_cli_lora_keys_load_in_comfyui_with_none_missing(comfy, tmp_path, caplog, name, targets):
    import comfy.lora

    bundle = diffusers_bundle(str(WRITERS[name](tmp_path / name)), height=32, width=32)
    adapters = bundle.add_lora(2, None, targets)
    sd = lora_state_dict(adapters, key=bundle.lora_key)
    key_map = comfy.lora.model_lora_keys_unet(comfy_model(bundle.family, bundle), {})
    caplog.set_level(logging.WARNING)
    patches = comfy.lora.load_lora(sd, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len(adapters) > 0
