"""`rewardlab train` on a diffusers Stable Diffusion folder (a tiny random one written by the test: UNet, VAE,
CLIP text encoder, a character-level CLIP tokenizer, DDPM scheduler; no downloads)."""
import json

import pytest

import torch

from rewardlab.cli import build_parser
from rewardlab.training import checkpoints as ckpt


def write_tiny_sd(path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(path / "unet")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(path / "vae")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "tokenizer" / "vocab.json"), str(path / "tokenizer" / "merges.txt"),
                  model_max_length=16).save_pretrained(path / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(path / "text_encoder")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(path / "scheduler")


def test_train_command_on_a_diffusers_folder(tmp_path, capsys):
    model = tmp_path / "sd"
    write_tiny_sd(model)
    out = tmp_path / "out"
    args = build_parser().parse_args([
        "train", "--model", str(model), "--reward", "saturation", "--device", "cpu", "--train-steps", "3",
        "--save-every", "2", "--steps", "3", "--batch-size", "2", "--width", "32", "--height", "32",
        "--method", "draft_lv", "--rank", "2", "--lr", "1e-2", "--out", str(out), "--name", "sd_lora",
        "--precision", "fp32"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "reward before" in printed and "step    3" in printed
    lora = out / "sd_lora.safetensors"
    for suffix in (".safetensors", "_curve.png", "_before.png", "_after.png", "_log.json"):
        assert (out / f"sd_lora{suffix}").exists(), suffix
    assert (out / "rewardlab_state" / "sd_lora.state.pt").exists()       # the state never sits beside the LoRA
    assert not list(out.glob("*.pt")) and not list(out.glob("*.part"))
    sd, state = ckpt.load_checkpoint(str(lora))
    assert state["step"] == 3
    # diffusers module names are written as kohya keys, which ComfyUI maps onto its SD UNet names
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") and "to_q" in k for k in sd)
    log = json.loads((out / "sd_lora_log.json").read_text())
    assert log["config"]["method"] == "draft_lv" and len(log["log"]) == 3

    # resume continues from the saved step
    args = build_parser().parse_args([
        "train", "--model", str(model), "--reward", "saturation", "--device", "cpu", "--train-steps", "4",
        "--steps", "3", "--batch-size", "2", "--width", "32", "--height", "32", "--method", "draft_lv",
        "--rank", "2", "--lr", "1e-2", "--out", str(out), "--name", "sd_lora", "--precision", "fp32", "--resume"])
    assert args.func(args) == 0
    assert "resumed" in capsys.readouterr().out
    assert ckpt.load_checkpoint(str(lora))[1]["step"] == 4


def run_cli(argv, capsys):
    """(exit status, stderr) of `rewardlab ...`."""
    from rewardlab.cli import main
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--name", "x" * 300], "shorten it to at most 200 bytes"),
    (["--name", "../up"], "'..'"),
    (["--batch-size", "0"], "batch_size (--batch-size) must be a finite number >= 1, got 0"),
    (["--lr", "nan"], "learning_rate (--lr) must be a finite number"),
    (["--reward", "brigthness"], "unknown reward model 'brigthness'"),
    (["--prompts", "/no/such/prompts.txt"], "--prompts /no/such/prompts.txt: no such file"),
    (["--sampler", "eulr"], "invalid choice: 'eulr'"),
    (["--k", "9", "--steps", "3"], "K=9 exceeds the 3 sampling steps"),
])
def test_train_command_rejects_bad_input_with_one_line_and_status_2_before_any_work(tmp_path, capsys, argv, says):
    code, err = run_cli(["train", "--out", str(tmp_path / "out"), "--device", "cpu", *argv], capsys)
    assert code == 2 and says in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_train_command_never_replaces_an_existing_lora_silently(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "draft_lora.safetensors").write_bytes(b"an earlier run")
    code, err = run_cli(["train", "--out", str(out)], capsys)
    assert code == 2 and "draft_lora.safetensors already exists: pass --resume to continue it, --overwrite" in err
    assert (out / "draft_lora.safetensors").read_bytes() == b"an earlier run"


def test_demo_rejects_bad_numbers_with_one_line_and_status_2(tmp_path, capsys):
    for argv, says in ((["--per-caption", "0"], "--per-caption: must be a finite number >= 1, got 0"),
                       (["--sampler", "dpm"], "invalid choice: 'dpm'")):
        code, err = run_cli(["demo", "--out", str(tmp_path), *argv], capsys)
        assert code == 2 and says in err.strip().splitlines()[-1]
