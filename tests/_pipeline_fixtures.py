"""Tiny random diffusers pipeline folders for `rewardlab train --model`: SD 2.x-like (v-prediction), SDXL, SD3 (with
or without T5) and Flux
(guidance-distilled or schnell-like), built from diffusers' and transformers' own classes with small configs and
saved with ``save_pretrained`` (which writes model_index.json). No downloads: the CLIP tokenizer is character-level
from a written vocab, the T5 tokenizer a tokenizers-library WordLevel model. 32×32 images, 16×16 latents."""
import json

import torch

WORDS = ("a an the on of photo cat dog red green blue yellow white black circle square triangle cross "
         "background").split()


def clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=12)


def clip(cls, vocab_size, hidden=32):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, projection_dim=hidden))


def t5(d_model):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_ff=64, d_kv=16, num_layers=1,
                                   num_heads=2))


def vae(latent_channels, **factors):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=8,
                         layers_per_block=1, sample_size=32, **factors)


def write_sd(path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = clip_tokenizer(path.parent / (path.name + "_tok"))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    StableDiffusionPipeline(
        vae=vae(4), text_encoder=clip(CLIPTextModel, len(tok)), tokenizer=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(path)
    return path


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    # SDXL's layout in small: no attention at the first level, linear projections, size/crop "text_time" embedding
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)


def write_sdxl(path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = clip_tokenizer(path.parent / (path.name + "_tok"))
    StableDiffusionXLPipeline(
        vae=vae(4, scaling_factor=0.13025), text_encoder=clip(CLIPTextModel, len(tok)),
        text_encoder_2=clip(CLIPTextModelWithProjection, len(tok)), tokenizer=tok, tokenizer_2=tok, unet=sdxl_unet(),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         timestep_spacing="leading", steps_offset=1),
    ).save_pretrained(path)
    return path


def sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                 pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16)


def write_sd3(path, with_t5=True):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = clip_tokenizer(path.parent / (path.name + "_tok"))
    StableDiffusion3Pipeline(
        transformer=sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip(CLIPTextModelWithProjection, len(tok)), tokenizer=tok,
        text_encoder_2=clip(CLIPTextModelWithProjection, len(tok)), tokenizer_2=tok,
        text_encoder_3=t5(64) if with_t5 else None, tokenizer_3=t5_tokenizer() if with_t5 else None,
    ).save_pretrained(path)
    return path


def flux_transformer(guidance_embeds=True):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))


def write_flux(path, guidance_embeds=True):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = clip_tokenizer(path.parent / (path.name + "_tok"))
    FluxPipeline(
        transformer=flux_transformer(guidance_embeds),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=guidance_embeds, shift=3.0 if guidance_embeds
                                                  else 1.0, base_shift=0.5, max_shift=1.15),
        vae=vae(16, scaling_factor=0.3611, shift_factor=0.1159), text_encoder=clip(CLIPTextModel, len(tok)),
        tokenizer=tok, text_encoder_2=t5(32), tokenizer_2=t5_tokenizer(),
    ).save_pretrained(path)
    return path


WRITERS = {"sd": write_sd, "sdxl": write_sdxl, "sd3": write_sd3, "sd3-no-t5": lambda p: write_sd3(p, with_t5=False),
           "flux": write_flux, "flux-schnell": lambda p: write_flux(p, guidance_embeds=False)}
