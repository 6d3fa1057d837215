"""DRaFT-1 and DRaFT-LV raise a weight-free reward on the embedded tiny model, on the training prompts and on
held-out prompts (fixed seeds; measured numbers asserted with a margin)."""
import pytest
import torch

from rewardlab.rewards.simple import SimpleReward, brightness
from rewardlab.training.bundle import tiny_bundle
from rewardlab.training.draft import DraftConfig, Trainer
from rewardlab.training.lora import remove_lora

TRAIN = ["a red circle on a blue background", "a green square on a white background",
         "a yellow cross on a black background"]
HELDOUT = ["a blue triangle on a red background", "a white circle on a green background"]


def tiny_model():
    """The shipped tiny model; a seeded random-init one of the same architecture while its weights are absent."""
    from rewardlab.tiny import model as tm
    try:
        return tm.load_tiny()
    except FileNotFoundError:
        from rewardlab.tiny.text import TinyTextEncoder
        torch.manual_seed(0)
        config = dict(unet=tm.DEFAULT_UNET, text=tm.DEFAULT_TEXT, schedule=tm.DEFAULT_SCHEDULE)
        m = tm.TinyModel(tm.build_unet(), TinyTextEncoder(**tm.DEFAULT_TEXT), tm.ddpm_scheduler().alphas_cumprod,
                         config)
        return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("method", ["draft_k", "draft_lv"])
def test_draft_raises_a_weight_free_reward_on_train_and_heldout_prompts(model, method):
    torch.manual_seed(0)
    reward = SimpleReward("darkness", lambda x: 1 - brightness(x))    # weight-free; room to grow on this model
    # "simple" spacing keeps the last step at a sizeable σ, so one grad step (K=1) can move the image
    cfg = DraftConfig(method=method, k=1, lv_n=2, steps=3, scheduler="simple", cfg=2.0, batch_size=2, lr=3e-3,
                      rank=4, targets=None, train_steps=10, seed=0, heldout_every=5)
    tr = Trainer(tiny_bundle(model), reward, cfg, prompts=TRAIN, heldout=HELDOUT)
    try:
        before_train, before_held = tr.evaluate(TRAIN), tr.evaluate()
        result = tr.train()
        after_train, after_held = tr.evaluate(TRAIN), tr.evaluate()
        lora_off = tr.evaluate(TRAIN, scale=0.0)
    finally:
        remove_lora(model.unet, tr.adapters)          # the module-scoped model goes back to its base weights
    print(method, before_train, after_train, before_held, after_held)
    assert result.status == "completed" and len(result.log) == 10
    assert after_train > before_train + 0.1
    assert after_held > before_held + 0.1
    assert [r["heldout_reward"] for r in result.log if "heldout_reward" in r] == pytest.approx(
        [result.log[4]["heldout_reward"], after_held])
    assert lora_off == pytest.approx(before_train, abs=1e-6)     # LoRA scale 0 is the untouched base model


def test_demo_compares_draft_and_draft_plus_on_held_out_prompts(model, tmp_path):
    from PIL import Image

    from rewardlab.training.cli import DEMO_KL_WEIGHT, TINY_HELDOUT, demo_training
    lines = []
    summary = demo_training(str(tmp_path), train_steps=2, model=model, log=lines.append)
    assert not any(hasattr(m, "parametrizations") for m in model.unet.modules())   # the caller's model is untouched
    plain, plus = summary["runs"]["DRaFT-1"], summary["runs"]["DRaFT+ (KL to base)"]
    assert (plain["kl_weight"], plus["kl_weight"]) == (0.0, DEMO_KL_WEIGHT) == (0.0, 1.0)    # NeMo's kl_coeff
    assert all(r["kl"] is None for r in plain["log"]) and all(r["kl"] is not None for r in plus["log"])
    for record in (summary["base"], plain, plus):
        assert 0 <= record["caption_accuracy"] <= 1 and record["heldout_reward"] > 0
    for path in (plain["lora"], plus["lora"], summary["comparison"], summary["curves"]):
        assert (tmp_path / path.split("/")[-1]).exists()
    width, height = Image.open(summary["comparison"]).size
    assert width > 3 * 3 * 128 and 2 * 128 < height < 3 * 128   # three panels of 3 x 2 held-out images, 4x enlarged
    assert len(TINY_HELDOUT) == 6 and "captions right" in lines[0]
    assert (tmp_path / "demo_summary.json").exists()
