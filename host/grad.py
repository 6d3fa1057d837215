"""Grad-ready ComfyUI models: autograd through weights that ComfyUI loaded inside ``torch.inference_mode()``.

ComfyUI runs every node in inference mode, so loaded weights are inference tensors that autograd refuses to save
for backward. A weight wrapper on every weight and bias makes ``comfy.ops`` copy the weight on each forward; a copy
made outside inference mode is a normal tensor. ``grad_ready`` puts those wrappers on a clone, so the user's
MODEL/VAE stay untouched; a LoRA adapter is just another wrapper (docs/comfyui.md, "Autograd inside ComfyUI").
"""
import contextlib
import importlib

import torch

from .. import runtime
from ..samplers.runner import checkpointed
from .services import managed_patchers
from ..training.lora import ATTENTION_TARGETS, LoRA, layer_name_patterns, lora_targets


def _comfy(module):
    return importlib.import_module(module)


def _identity(t):
    return t


def _wrappable_keys(model_patcher):
    """'<module>.weight' / '<module>.bias' of every comfy-op module (the layers whose forward applies wrappers)."""
    for name, m in model_patcher.model.named_modules():
        if hasattr(m, "weight_function"):
            for attr in ("weight", "bias"):
                if getattr(m, attr, None) is not None:
                    yield f"{name}.{attr}"


def grad_ready(model_patcher, wrappers=None):
    """A clone of ``model_patcher`` (a MODEL or ``vae.patcher``) that autograd can run through.

    ``wrappers`` maps a full weight key (e.g. ``"diffusion_model.out.2.weight"``) to a callable on the weight,
    such as a LoRA adapter; every other weight and bias of a ComfyUI layer gets the identity. Every other parameter
    and buffer (norm scales such as Flux's QK-norm, embedding tables, positional tables) is swapped for a normal copy
    while this clone is loaded (an object patch), so nothing the forward uses is an inference tensor. Base weights
    are frozen.
    """
    wrappers = dict(wrappers or {})
    patcher = model_patcher.clone()
    wrapped = set(_wrappable_keys(patcher))
    for key in wrapped:
        patcher.add_weight_wrapper(key, wrappers.pop(key, _identity))
    if wrappers:
        raise ValueError(f"weight wrappers for keys this model does not have, e.g. {sorted(wrappers)[:3]}")
    with torch.inference_mode(False):     # whatever another clone left in the shared modules, ours are normal
        for key, tensor in _network_tensors(patcher):
            if key not in wrapped:
                patcher.add_object_patch(key, _normal_copy(tensor))
    patcher.model.requires_grad_(False)     # only the wrappers' own parameters may collect gradients
    return patcher


def _network_tensors(patcher):
    """Parameters and buffers of the network itself: a MODEL's diffusion_model (not its sampling tables), a VAE's
    whole model; none below an object another patch replaces (their keys would not exist while loaded)."""
    model = patcher.model
    prefix = "diffusion_model." if hasattr(model, "diffusion_model") else ""
    replaced = tuple(k + "." for k in patcher.object_patches)
    for key, tensor in (*model.named_parameters(), *model.named_buffers()):
        if key.startswith(prefix) and not key.startswith(replaced):
            yield key, tensor


def _normal_copy(tensor):
    copy = tensor.detach().clone()
    return torch.nn.Parameter(copy, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else copy


def checkpoint_blocks(model_patcher):
    """Recompute each block of the diffusion model in backward instead of keeping its activations (gradient
    checkpointing inside one model call, as ComfyUI's own trainer offers): a call that records gradients then keeps
    only the blocks' inputs, which is what lets a DRaFT or ReNO step of a large DiT fit. The blocks are the entries
    of the model's block lists (``model_blocks``); the patch lives on this clone only and goes away when it is
    unloaded."""
    for name, block in model_blocks(model_patcher.model.diffusion_model):
        model_patcher.add_object_patch(f"diffusion_model.{name}.forward", checkpointed(block.forward))
    return model_patcher


def model_blocks(network):
    """(name, module) of the blocks a diffusion model calls one after another: the entries of its block lists and
    its middle block; a UNet level (a Sequential its forward walks layer by layer) gives its layers."""
    for list_name, child in network.named_children():
        if isinstance(child, torch.nn.ModuleList):
            entries = [(f"{list_name}.{i}", block) for i, block in enumerate(child)]
        elif list_name == "middle_block":
            entries = [(list_name, child)]
        else:
            continue
        for name, block in entries:
            if isinstance(block, torch.nn.Sequential):
                yield from ((f"{name}.{j}", layer) for j, layer in enumerate(block))
            else:
                yield name, block


def is_grad_ready(model_patcher):
    return all(k in model_patcher.weight_wrapper_patches for k in _wrappable_keys(model_patcher))


def inference_tensors(model):
    """Names of the network parameters and buffers of a loaded model (BaseModel) that autograd cannot save for
    backward: inference tensors that no weight wrapper copies."""
    network = getattr(model, "diffusion_model", model)
    covered = {f"{name}.{attr}" for name, m in network.named_modules() for attr in ("weight", "bias")
               if getattr(m, f"{attr}_function", None)}
    return [k for k, t in (*network.named_parameters(), *network.named_buffers())
            if t.is_inference() and k not in covered]


def check_grad_ready(model):
    """Fail early, naming them, when parameters of a loaded model would break the backward pass."""
    stuck = inference_tensors(model)
    if stuck:
        raise RuntimeError(f"{len(stuck)} parameters/buffers of this model are inference tensors that gradients "
                           f"cannot pass, e.g. {stuck[:5]}: the model was not prepared with host.grad.grad_ready "
                           "(please report this with the model family)")


def lora_patcher(model_patcher, rank=8, alpha=None, targets=ATTENTION_TARGETS, init="default"):
    """Grad-ready clone of a MODEL with a trainable ``training.lora.LoRA`` on every matching diffusion-model layer.

    targets: "attention", "attention + feed-forward" or "all" (resolved per model family), module-name suffixes,
    a regex string, or None for every layer. Returns (patcher, adapters) with adapters keyed by the name their LoRA is
    saved under, so ``training.lora.lora_state_dict(adapters)`` writes ``diffusion_model.<module>.lora_up.weight``
    etc. (``<module>_qkv`` for the q/k/v rows of Flux's fused single-block layer): keys stock LoraLoader reads.
    """
    dm = model_patcher.model.diffusion_model
    chosen = lora_targets(dm, targets)
    if not chosen:
        raise ValueError(f"no Linear/Conv layer of this model matches LoRA targets {targets!r}; its layers are named "
                         f"like {layer_name_patterns(dm)}")
    modules = dict(dm.named_modules())
    with torch.inference_mode(False):       # adapter parameters must be normal (trainable) tensors
        adapters = {t.key: LoRA(modules[t.module].weight.shape, rank, alpha, init, device=model_patcher.load_device,
                                rows=t.rows) for t in chosen}
    patcher = grad_ready(model_patcher, {f"diffusion_model.{t.module}.weight": adapters[t.key] for t in chosen})
    return patcher, adapters


def apply_lora_state_dict(model, lora_sd, strength=1.0):
    """A MODEL with a saved LoRA merged by ComfyUI's own loader (what LoraLoaderModelOnly does): a normal, fast
    MODEL for KSampler, with no live autograd modules."""
    return _comfy("comfy.sd").load_lora_for_models(model, None, lora_sd, strength, 0)[0]


@contextlib.contextmanager
def grad_enabled():
    """Context for training inside a node: leaves inference mode and turns autograd on."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def load_for_training(*patchers):
    """Load the grad-ready patchers fully before training, with the reward models ComfyUI manages for us (so that
    scoring never makes ComfyUI evict the model being trained): evicts everything else (the guider's memory
    estimate ignores activations kept for backward) and avoids lowvram partial loading."""
    _comfy("comfy.model_management").load_models_gpu(list(patchers) + managed_patchers(), memory_required=1e20,
                                                      force_full_load=True)


def release(*patchers):
    """After training/optimisation: unload our grad-ready clones, strip their wrappers from the shared modules
    (so nothing of ours, e.g. a LoRA, stays attached to the user's model) and give cached memory back."""
    mm = _comfy("comfy.model_management")
    for p in patchers:
        if p is None:
            continue
        was_loaded = False
        for i in reversed(range(len(mm.current_loaded_models))):
            if mm.current_loaded_models[i].model is p:
                mm.current_loaded_models.pop(i).model_unload()
                was_loaded = True
        if was_loaded:      # our clone owned the modules' wrapper lists; another clone's are left alone
            for m in p.model.modules():
                if hasattr(m, "weight_function"):
                    m.weight_function, m.bias_function = [], []
    runtime.current().free_memory()
