"""Reward fine-tuning (DRaFT family) of LoRA adapters. Python API:

    from rewardlab.training import DraftConfig, Trainer, tiny_bundle
    trainer = Trainer(tiny_bundle(), reward, DraftConfig(method="draft_lv"), prompts=[...], lora_path="out/x.safetensors")
    result = trainer.train()
"""
from .bundle import ModelBundle, TorchBundle, tiny_bundle
from .draft import METHODS, DraftConfig, TrainingStopped, TrainResult, Trainer
from .pipelines import diffusers_bundle

__all__ = ["ModelBundle", "TorchBundle", "diffusers_bundle", "tiny_bundle", "METHODS", "DraftConfig",
           "TrainingStopped", "TrainResult", "Trainer"]
