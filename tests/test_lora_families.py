"""LoRA targets mean the same on every model family: the attention projections, optionally the MLPs, never
embeddings, norms or modulation. Module trees below carry the layer names ComfyUI's own model classes use (checked
against the real classes in tests/comfyui/test_families_comfy.py)."""
import pytest
import torch
from torch import nn

from rewardlab.training.lora import (LoRA, family_of, family_targets, inject_lora, lora_state_dict, lora_targets,
                                     FAMILIES)


def tree(names, shapes=None):
    """A module whose Linear layers have exactly these dotted names."""
    root = nn.Module()
    for name in names:
        parent = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        out, inp = (shapes or {}).get(name, (4, 4))
        parent.add_module(parts[-1], nn.Linear(inp, out))
    return root


UNET = ["time_embed.0", "input_blocks.1.0.emb_layers.1", "input_blocks.1.1.proj_in",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_k",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_v", "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_q", "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2", "label_emb.0.0"]
MMDIT = ["x_embedder.proj", "t_embedder.mlp.0", "y_embedder.mlp.0", "context_embedder",
         "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj", "joint_blocks.0.context_block.attn.qkv",
         "joint_blocks.0.context_block.attn.proj", "joint_blocks.0.x_block.mlp.fc1", "joint_blocks.0.x_block.mlp.fc2",
         "joint_blocks.0.x_block.adaLN_modulation.1", "final_layer.linear", "final_layer.adaLN_modulation.1"]
FLUX = ["img_in", "txt_in", "time_in.in_layer", "vector_in.in_layer", "guidance_in.in_layer",
        "double_blocks.0.img_mod.lin", "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj",
        "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2", "double_blocks.0.txt_mod.lin",
        "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.0.txt_mlp.0",
        "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1", "single_blocks.0.linear2",
        "single_blocks.0.modulation.lin", "final_layer.linear", "final_layer.adaLN_modulation.1"]
LUMINA = ["x_embedder", "t_embedder.mlp.0", "cap_embedder.1", "noise_refiner.0.attention.qkv",
          "noise_refiner.0.attention.out", "noise_refiner.0.feed_forward.w1", "noise_refiner.0.adaLN_modulation.1",
          "layers.0.attention.qkv", "layers.0.attention.out", "layers.0.feed_forward.w1", "layers.0.feed_forward.w2",
          "layers.0.feed_forward.w3", "layers.0.adaLN_modulation.1", "final_layer.linear"]


def chosen(model, choice):
    return sorted(t.key for t in family_targets(model, choice))


def test_unet_attention_feed_forward_and_all():
    m = tree(UNET)
    assert family_of(m).name.startswith("UNet")
    assert chosen(m, "attention") == sorted(n for n in UNET if ".attn" in n)
    assert chosen(m, "attention + feed-forward") == sorted(n for n in UNET if ".attn" in n or ".ff." in n)
    # "all": every layer of the blocks, but never the time/label embeddings or the resnets' time modulation
    assert chosen(m, "all") == sorted(n for n in UNET if not n.startswith(("time_embed", "label_emb"))
                                      and "emb_layers" not in n)


def test_mmdit_targets_are_the_joint_attention_and_mlps_never_modulation():
    m = tree(MMDIT)
    assert family_of(m).name.startswith("MMDiT")
    assert chosen(m, "attention") == sorted(n for n in MMDIT if ".attn." in n)
    assert chosen(m, "attention + feed-forward") == sorted(n for n in MMDIT if ".attn." in n or ".mlp.fc" in n)
    assert chosen(m, "all") == sorted(chosen(m, "attention + feed-forward"))       # nothing else is a block layer


def test_flux_attention_includes_the_qkv_rows_of_the_fused_single_block_layer():
    h, mlp = 4, 16
    m = tree(FLUX, {"single_blocks.0.linear1": (3 * h + mlp, h), "single_blocks.0.linear2": (h, h + mlp)})
    assert family_of(m).name.startswith("Flux")
    attention = family_targets(m, "attention")
    assert sorted(t.key for t in attention) == sorted(
        [n for n in FLUX if "_attn." in n] + ["single_blocks.0.linear1_qkv"])
    fused = next(t for t in attention if t.key.endswith("_qkv"))
    assert fused.module == "single_blocks.0.linear1" and fused.rows == (0, 3 * h)
    # with the MLPs the whole fused layers are trained (no separate row slice)
    assert chosen(m, "attention + feed-forward") == sorted(
        [n for n in FLUX if "_attn." in n or "_mlp." in n] + ["single_blocks.0.linear1", "single_blocks.0.linear2"])
    assert not any("mod" in k or k.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final"))
                   for k in chosen(m, "all"))


def test_lumina2_targets():
    m = tree(LUMINA)
    assert family_of(m).name.startswith("Lumina")
    assert chosen(m, "attention") == sorted(n for n in LUMINA if ".attention." in n)
    assert "layers.0.feed_forward.w3" in chosen(m, "attention + feed-forward")
    assert not any("adaLN" in k or "embedder" in k for k in chosen(m, "all"))


def test_unknown_family_names_its_layers_and_the_regex_escape_hatch():
    m = tree(["stem.proj", "blocks.0.mixer.in_proj", "blocks.1.mixer.in_proj", "blocks.0.mixer.out_proj"])
    assert family_of(m) is None
    with pytest.raises(ValueError) as e:
        lora_targets(m, "attention")
    assert "blocks.N.mixer.in_proj" in str(e.value) and "regex" in str(e.value)
    assert [t.module for t in lora_targets(m, r"mixer\.(in|out)_proj$")] == ["blocks.0.mixer.in_proj",
                                                                           "blocks.0.mixer.out_proj",
                                                                           "blocks.1.mixer.in_proj"]


def test_a_row_slice_lora_changes_only_its_rows_and_saves_under_its_own_key():
    torch.manual_seed(0)
    m = tree(FLUX, {"single_blocks.0.linear1": (12 + 16, 4), "single_blocks.0.linear2": (4, 20)})
    adapters = inject_lora(m, rank=2, targets="attention")
    a = adapters["single_blocks.0.linear1_qkv"]
    assert isinstance(a, LoRA) and a.up.shape == (12, 2)
    with torch.no_grad():
        a.up.normal_()
    layer = getattr(m.single_blocks, "0").linear1
    base = layer.parametrizations.weight.original
    diff = layer.weight - base
    assert diff[:12].abs().sum() > 0 and diff[12:].abs().sum() == 0
    sd = lora_state_dict(adapters)
    assert sd["diffusion_model.single_blocks.0.linear1_qkv.lora_up.weight"].shape == (12, 2)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in sd


def test_every_family_separates_attention_from_what_is_never_trained():
    for family in FAMILIES:
        assert family.attention and family.feed_forward and family.never and family.detect


def test_families_are_told_apart_by_their_own_layer_names():
    hidream = tree(["x_embedder.proj", "double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_k",
                    "double_stream_blocks.0.block.attn1.to_q_t", "double_stream_blocks.0.block.ff_i.w1",
                    "double_stream_blocks.0.block.adaLN_modulation.1"])
    assert family_of(hidream).name == "HiDream"             # attn1.to_q alone does not make a UNet
    assert chosen(hidream, "attention") == ["double_stream_blocks.0.block.attn1.to_k",
                                            "double_stream_blocks.0.block.attn1.to_q",
                                            "double_stream_blocks.0.block.attn1.to_q_t"]
    sd3_diffusers = tree(["pos_embed.proj", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj",
                          "transformer_blocks.0.ff.net.2", "transformer_blocks.0.norm1.linear", "proj_out"])
    assert family_of(sd3_diffusers).name.startswith("joint-attention")
    assert chosen(sd3_diffusers, "all") == ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_q",
                                            "transformer_blocks.0.ff.net.2"]
