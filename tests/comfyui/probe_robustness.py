"""Probe: replay every failure of issue 14 ("Nothing lost, nothing overwritten, every bad input answered clearly")
against a live headless ComfyUI server started as tests/comfyui/conftest.py starts it, and print what each probe now
gets. Not collected by a plain `pytest tests/comfyui` (it trains several tiny LoRAs); run it on purpose:

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python -m pytest -s -q tests/comfyui/probe_robustness.py

Every probe also asserts the fixed behaviour, so the run fails if any listed fault comes back. The report is
printed at the end (and written to $REWARDLAB_PROBE_REPORT when set).
"""
import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch

from .conftest import CLIP_FILE, UNET_FILE, VAE_FILE

REPORT = []
PACKAGE_PARENT = str(Path(__file__).resolve().parents[3])     # the folder holding the rewardlab package


def note(item, text):
    REPORT.append(f"[{item}] {text}")


# --- talking to the server --------------------------------------------------------------------------------------

def post(server, route, payload=None, data=None, headers=None):
    """(status, parsed JSON body) of a POST; HTTP errors are answers too."""
    body = json.dumps(payload).encode() if payload is not None else data
    req = urllib.request.Request(server.url + route, data=body,
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def queue(server, nodes, timeout=600):
    """Queue an API prompt {id: (class, inputs)}; returns ("rejected", response) or (status_str, history entry,
    seconds)."""
    prompt = {str(k): {"class_type": c, "inputs": i} for k, (c, i) in nodes.items()}
    t0 = time.monotonic()
    code, answer = post(server, "/prompt", {"prompt": prompt, "client_id": "rewardlab-probe"})
    if code != 200:
        return "rejected", answer, time.monotonic() - t0
    pid = answer["prompt_id"]
    while time.monotonic() - t0 < timeout:
        entry = server.get_json(f"/history/{pid}").get(pid)
        if entry:
            return entry["status"]["status_str"], entry, time.monotonic() - t0
        time.sleep(0.3)
    raise TimeoutError(pid)


def error_of(entry):
    """The exception message of a failed prompt's history entry."""
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return data["exception_message"].strip()
    return None


def rejection(answer):
    """The custom-validation details of a rejected prompt (one line per failing node)."""
    return "; ".join(e.get("details", "") for n in answer.get("node_errors", {}).values() for e in n["errors"])


def link(node, out=0):
    return [str(node), out]


MODELS = {1: ("UNETLoader", {"unet_name": UNET_FILE, "weight_dtype": "default"}),
          2: ("CLIPLoader", {"clip_name": CLIP_FILE, "type": "stable_diffusion"}),
          3: ("VAELoader", {"vae_name": VAE_FILE}),
          4: ("CLIPTextEncode", {"text": "a red square", "clip": link(2)}),
          5: ("ConditioningZeroOut", {"conditioning": link(4)}),
          6: ("RewardLabWeightFreeReward", {"kind": "colourfulness", "red": 1.0, "green": 0.0, "blue": 0.0,
                                            "hue_degrees": 0.0, "brightness_target": -1.0, "jpeg_quality": 95})}


def trains(name, **kw):
    """A DRaFT Train LoRA node (7) and a preview of its curve (20), so the prompt has an output."""
    return {7: draft(name, **kw), 20: ("PreviewImage", {"images": link(7, 2)})}


def draft(name, **kw):
    inputs = {"model": link(1), "vae": link(3), "reward": link(6), "positive": link(4), "negative": link(5),
              "prompts": "a red square", "sampler": "euler", "scheduler": "normal", "steps": 1, "cfg": 1.0,
              "width": 64, "height": 64, "batch_size": 1, "method": "DRaFT-K", "k": 1, "lv_n": 2,
              "learning_rate": 1e-3, "rank": 2, "training_steps": 1, "save_every": 0, "name": name, "seed": 0,
              "precision": "fp32"}
    inputs.update(kw)
    return ("RewardLabDRaFTTrainLoRA", inputs)


def png(size, level=128):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (level, level, level)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width, height):
    data = bytearray(png((4, 4)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def upload(server, image, reward):
    boundary = "rewardlabprobe"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="reward"\r\n\r\n{reward}\r\n'.encode(),
             f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
             f'Content-Type: image/png\r\n\r\n'.encode() + image + b"\r\n", f"--{boundary}--\r\n".encode()]
    return post(server, "/rewardlab/score", data=b"".join(parts),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def rewardlab_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "rewardlab", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def loras(server):
    return server.output_dir / "loras"


# --- the probes -------------------------------------------------------------------------------------------------

def test_1_nan_after_a_diverged_update(tmp_path):
    code, out, err = rewardlab_cli("train", "--reward", "colourfulness", "--train-steps", "8", "--save-every", "1",
                                   "--lr", "1e6", "--max-grad-norm", "0", "--out", str(tmp_path))
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    note(1, f"`rewardlab train --lr 1e6 --max-grad-norm 0 --save-every 1` exit {code}: {last_line(out + err)} "
            f"Files left: {files or 'none'}")
    assert code == 1 and "no checkpoint was kept" in out and not files


def test_2_unwritable_names_fail_before_any_work(server, loras):
    long = "x" * 300
    status, answer, seconds = queue(server, {**MODELS, **trains(long)})
    note(2, f"DRaFT Train with a 300-character name: {status} in {seconds:.2f}s: {rejection(answer)[:160]}...")
    assert status == "rejected" and "shorten it to at most 200 bytes" in rejection(answer)
    status, answer, seconds = queue(server, {**MODELS, 7: draft("probe_ok"),
                                             8: ("RewardLabSaveRewardLoRA", {"lora": link(7, 1), "name": long})})
    note(2, f"Save Reward LoRA with a 300-character name: {status} in {seconds:.2f}s (nothing trained): "
            f"{rejection(answer)[:120]}...")
    assert status == "rejected" and not (loras / "probe_ok.safetensors").exists()


def test_3_no_silent_collisions_or_overwrites(server, loras):
    for bad in ("..", "", "   ", "../escape"):
        status, answer, _ = queue(server, {**MODELS, 7: draft("probe_src"),
                                           8: ("RewardLabSaveRewardLoRA", {"lora": link(7, 1), "name": bad})})
        note(3, f"Save Reward LoRA named {bad!r}: {status}: {rejection(answer)}")
        assert status == "rejected"
    status, entry, _ = queue(server, {**MODELS, **trains("probe_run", save_every=1)})
    assert status == "success" and (loras / "probe_run.safetensors").exists()
    state = server.output_dir / "rewardlab_state" / "probe_run.state.pt"
    first = (loras / "probe_run.safetensors").read_bytes()
    status, entry, _ = queue(server, {**MODELS, 7: draft("probe_other"),
                                      8: ("RewardLabSaveRewardLoRA", {"lora": link(7, 1), "name": "probe_run"}),
                                      9: ("RewardLabSaveRewardLoRA", {"lora": link(7, 1), "name": "sub/dir/name"}),
                                      10: ("RewardLabSaveRewardLoRA", {"lora": link(7, 1), "name": "name"})})
    shown = [entry["outputs"][n]["text"][0] for n in ("8", "9", "10")]
    note(3, f"Save Reward LoRA named like an earlier DRaFT run, 'sub/dir/name', 'name': {status}, UI shows {shown}; "
            f"the DRaFT run's LoRA unchanged: {(loras / 'probe_run.safetensors').read_bytes() == first}, "
            f"its state kept: {state.exists()}")
    assert shown == ["saved as probe_run_00001.safetensors", "saved as sub/dir/name.safetensors",
                     "saved as name.safetensors"]
    assert (loras / "probe_run.safetensors").read_bytes() == first and state.exists()
    status, entry, _ = queue(server, {**MODELS, 7: draft("probe_other"),
                                      8: ("RewardLabSaveRewardLoRA", {"lora": link(7, 1), "name": "probe_run",
                                                                      "overwrite": True})})
    note(3, f"... with overwrite on: {status}, {entry['outputs']['8']['text'][0]}, stale state removed: "
            f"{not state.exists()}")
    assert not state.exists() and (loras / "probe_run.safetensors").read_bytes() != first


def test_4_the_lora_list_shows_only_loras(server, loras):
    from rewardlab.training import checkpoints as ckpt

    ckpt.save_lora_file({"diffusion_model.x.lora_up.weight": torch.zeros(2, 1),
                         "diffusion_model.x.lora_down.weight": torch.zeros(1, 2)}, str(loras / "legacy.safetensors"))
    torch.save({"step": 1, "optimizer": {}}, str(loras / "legacy.state.pt"))      # the layout of earlier versions
    status, _, _ = queue(server, {**MODELS, **trains("probe_list")})
    listed = server.get_json("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    not_loras = [n for n in listed if not n.endswith(".safetensors")]
    note(4, f"LoraLoader lists {len(listed)} files after a run (an old legacy.state.pt was moved to "
            f"rewardlab_state/: {(server.output_dir / 'rewardlab_state' / 'legacy.state.pt').exists()}); "
            f"entries that are not LoRAs: {not_loras or 'none'}")
    assert status == "success" and not not_loras


def test_5_score_route_answers_400(server):
    for label, image, reward in (("1x1 with sharpness", png((1, 1)), "sharpness"),
                                 ("2x2 with sharpness", png((2, 2)), "sharpness"),
                                 ("PNG header claiming 20000x20000", png_claiming(20000, 20000), "brightness")):
        code, body = upload(server, image, reward)
        note(5, f"/rewardlab/score, {label}: {code} {body.get('error')}")
        assert code == 400


def test_6_raw_errors_now_name_the_fix(server, tmp_path):
    # Rank Images: 3 images, a 1-sample latent
    status, entry, _ = queue(server, {
        **MODELS, 7: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 3}),
        8: ("VAEDecode", {"samples": link(7), "vae": link(3)}),
        9: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        10: ("RewardLabRankImages", {"reward": link(6), "images": link(8), "prompts": "", "top_k": 1,
                                     "order": "best first", "latent": link(9)}),
        11: ("PreviewImage", {"images": link(10)})})
    note(6, f"Rank Images, 3 images + 1-sample latent: {status}: {error_of(entry)}")
    assert "LATENT holds 1 sample(s) but there are 3 images" in error_of(entry)
    # ReNO with a 5-D latent
    status, entry, _ = queue(server, {
        **MODELS, 7: ("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 5, "batch_size": 1}),
        8: ("RewardLabReNOOptimiseNoise", {"model": link(1), "positive": link(4), "negative": link(5), "vae": link(3),
                                           "latent": link(7), "reward": link(6), "steps": 1, "sampler": "euler",
                                           "scheduler": "normal", "cfg": 1.0, "seed": 0, "batch": 1,
                                           "iterations": 2, "lr": 1.0, "reg_weight": 0.01}),
        9: ("PreviewImage", {"images": link(8, 2)})})
    note(6, f"ReNO with a 5-D latent: {status}: {error_of(entry)}")
    assert "the LATENT is 5-D" in error_of(entry)
    # resume with other targets
    status, entry, _ = queue(server, {**MODELS, **trains("probe_resume", save_every=1)})
    assert status == "success"
    status, entry, _ = queue(server, {**MODELS, **trains("probe_resume", resume=True, training_steps=2,
                                                         targets="attention + feed-forward")})
    note(6, f"resume with other targets: {status}: {error_of(entry)}")
    assert "resume with the settings it was trained with" in error_of(entry)
    # resume from a malicious .state.pt
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 1, "optimizer": {}, "x": Payload()},
               str(server.output_dir / "rewardlab_state" / "probe_resume.state.pt"))
    status, entry, _ = queue(server, {**MODELS, **trains("probe_resume", resume=True, training_steps=2)})
    note(6, f"resume from a malicious .state.pt: {status}: {error_of(entry)} (payload ran: {marker.exists()})")
    assert "refused to load the training state" in error_of(entry) and "weights_only" not in error_of(entry)
    assert not marker.exists()
    # reward files: a pickle needing a class, a transformers CLIP as the aesthetic CLIP
    from safetensors.torch import save_file

    folder = tmp_path / "rewards"
    folder.mkdir()
    sys.modules.setdefault("probe_classes", type(sys)("probe_classes"))
    NeedsAClass = type("NeedsAClass", (), {"__module__": "probe_classes"})
    sys.modules["probe_classes"].NeedsAClass = NeedsAClass
    torch.save({"state_dict": {"w": torch.zeros(1)}, "model": NeedsAClass()}, str(folder / "HPS_v2.1_compressed.pt"))
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2),
               "text_model.final_layer_norm.weight": torch.zeros(4)},
              str(folder / "ViT-L-14-quickgelu-openai.safetensors"))
    torch.save({"layers.0.weight": torch.zeros(1024, 768)}, str(folder / "sac+logos+ava1-l14-linearMSE.pth"))
    for model in ("hps-v2.1", "aesthetic-v2"):
        status, entry, _ = queue(server, {
            **MODELS, 7: ("RewardLabLoadReward", {"model_name": model, "dtype": "fp32", "device": "cpu",
                                                  "folder": str(folder)}),
            8: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
            9: ("VAEDecode", {"samples": link(8), "vae": link(3)}),
            10: ("RewardLabRankImages", {"reward": link(7), "images": link(9), "prompts": "a cat", "top_k": 1,
                                         "order": "best first"}),
            11: ("PreviewImage", {"images": link(10)})})
        note(6, f"Load Reward Model {model} from a bad file: {status}: {error_of(entry)[:400]}")
        assert "\x1b" not in error_of(entry) and "weights_only" not in error_of(entry)
        assert ("probe_classes.NeedsAClass" if model == "hps-v2.1" else "transformers") in error_of(entry)
    # an empty prompt list with CLIP connected
    status, entry, _ = queue(server, {**MODELS, **trains("probe_empty", prompts="  \n ", clip=link(2))})
    note(6, f"DRaFT Train with an empty prompt list (CLIP connected): {status}: {error_of(entry)}")
    assert "prompts box is empty" in error_of(entry)


def test_7_cli_mistakes_are_caught_before_the_first_request(server, tmp_path):
    wf = tmp_path / "wf.json"
    prompt = {str(k): {"class_type": c, "inputs": i} for k, (c, i) in {
        1: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        2: ("VAELoader", {"vae_name": VAE_FILE}), 3: ("VAEDecode", {"samples": link(1), "vae": link(2)}),
        4: ("SaveImage", {"images": link(3), "filename_prefix": "probe"})}.items()}
    wf.write_text(json.dumps(prompt))
    history = len(server.get_json("/history"))
    for args in (["--score", "brigthness"], ["--concurrency", "0"]):
        code, out, err = rewardlab_cli("run", str(wf), "--server", server.url, "--out", str(tmp_path / "out"),
                                       "--set", "1.batch_size=1..2", *args, cwd=str(tmp_path))
        note(7, f"rewardlab run {' '.join(args)}: exit {code}: {last_line(err)}")
        assert code == 2 and "Traceback" not in err and "error: " in last_line(err)
    assert len(server.get_json("/history")) == history            # nothing was queued


def test_8_no_false_random_init_notice(caplog):
    """Real HPS / aesthetic weights are GBs; the same loader path on the tiny open_clip config of the unit tests."""
    import logging

    from safetensors.torch import save_file

    from rewardlab.rewards.clip_models import build_open_clip, load_clipscore

    config = {"clip_model": "ViT-B-32", "quick_gelu": True, "overrides": dict(
        embed_dim=16, vision_cfg={"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})}
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "rewardlab_probe_clip.safetensors"
    save_file({k: v.contiguous() for k, v in build_open_clip(config).state_dict().items()}, str(path))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_clipscore("probe-clip", config, {"weights": str(path)})
    notices = [r.getMessage() for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    note(8, f"open_clip 'No pretrained weights loaded ... initialized randomly' while our loader loads weights: "
            f"{len(notices)} time(s)")
    assert not notices
    path.unlink()


def test_report():
    text = "\n".join(REPORT)
    print("\n--- issue 14 probe against a live ComfyUI server ---\n" + text)
    if os.environ.get("REWARDLAB_PROBE_REPORT"):
        Path(os.environ["REWARDLAB_PROBE_REPORT"]).write_text(text + "\n")
    assert len({line.split("]")[0] for line in REPORT}) == 8
