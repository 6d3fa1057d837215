"""Integration tests against a real ComfyUI checkout. Everything here is skipped unless COMFYUI_PATH points at one.

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python -m pytest -q tests/comfyui

Fixtures are download-free (docs/comfyui.md, "Testing against ComfyUI"): a tiny SD15-class ldm UNet (one level, model_channels 320,
context_dim 768: detected as SD15), a random CLIP-L text model (transformers) and a random SD-shaped VAE, written
as safetensors and loaded through the stock UNETLoader / CLIPLoader / VAELoader inside ``torch.inference_mode()``,
exactly as a ComfyUI worker runs nodes. Files are cached per session in a temp dir, or in
$REWARDLAB_COMFY_FIXTURES when set (reused across runs).
"""
import os
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import torch

from .families import init_

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
UNET_FILE, CLIP_FILE, VAE_FILE = "tiny_sd15_unet.safetensors", "tiny_clip_l.safetensors", "tiny_sd_vae.safetensors"


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH and Path(COMFYUI_PATH, "comfy").is_dir():
        return
    skip = pytest.mark.skip(reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI integration tests")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(skip)


# --- in-process ComfyUI --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI importable in this process, on CPU, writing only into temp dirs. Returns its ``nodes`` module (the
    stock node classes). Run tests/comfyui on its own: comfy stays imported for the rest of a pytest session."""
    # one thread: the tiny models gain nothing from more, and a shared 2-core box thrashes with OpenMP spinning
    torch.set_num_threads(int(os.environ.get("REWARDLAB_TEST_THREADS", "1")))
    path = str(Path(COMFYUI_PATH).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    # `python -m pytest` puts the repo root (whose package dir is also called nodes/) first on sys.path
    stale = sys.modules.get("nodes")
    if stale is not None and not str(getattr(stale, "__file__", "")).startswith(path):
        del sys.modules["nodes"]
    from comfy.cli_args import args
    args.cpu = True                                  # must precede comfy.model_management (no CUDA here)
    import comfy.model_management  # noqa: F401
    import folder_paths
    import nodes
    io_root = tmp_path_factory.mktemp("comfy_io")
    for kind in ("output", "temp", "input"):
        (io_root / kind).mkdir()
        getattr(folder_paths, f"set_{kind}_directory")(str(io_root / kind))
    return nodes


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    root = Path(os.environ.get("REWARDLAB_COMFY_FIXTURES") or tmp_path_factory.mktemp("comfy_models"))
    for sub in ("diffusion_models", "text_encoders", "vae", "loras", "checkpoints"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def build_tiny_unet(path):
    import comfy.ops
    import safetensors.torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1], channel_mult=[1],
                     transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                     context_dim=768, num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True,
                     legacy=False, operations=comfy.ops.disable_weight_init)
    init_(unet, seed=1)
    safetensors.torch.save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))


def build_tiny_clip(path):
    import safetensors.torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(2)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    model = CLIPTextModelWithProjection(cfg)
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    safetensors.torch.save_file(sd, str(path))


def build_tiny_vae(path):
    import safetensors.torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_(vae, std=0.02, seed=3)
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(path))


@pytest.fixture(scope="session")
def model_files(comfy, model_dir):
    """Build (once) and register the fixture model files with folder_paths."""
    import folder_paths

    for sub, name, build in (("diffusion_models", UNET_FILE, build_tiny_unet), ("text_encoders", CLIP_FILE, build_tiny_clip),
                             ("vae", VAE_FILE, build_tiny_vae)):
        path = model_dir / sub / name
        if not path.exists():
            tmp = path.with_suffix(".part")
            build(tmp)
            tmp.rename(path)
        folder_paths.add_model_folder_path(sub, str(model_dir / sub))
    folder_paths.add_model_folder_path("loras", str(model_dir / "loras"))
    return model_dir


@pytest.fixture(scope="session")
def unet(comfy, model_files):
    with torch.inference_mode():            # as in a ComfyUI worker: weights become inference tensors
        return comfy.UNETLoader().load_unet(UNET_FILE, "default")[0]


@pytest.fixture(scope="session")
def clip(comfy, model_files):
    with torch.inference_mode():
        return comfy.CLIPLoader().load_clip(CLIP_FILE, "stable_diffusion")[0]


@pytest.fixture(scope="session")
def vae(comfy, model_files):
    with torch.inference_mode():
        return comfy.VAELoader().load_vae(VAE_FILE)[0]


@pytest.fixture(scope="session")
def conds(comfy, clip):
    with torch.inference_mode():
        positive = comfy.CLIPTextEncode().encode(clip, "a red square on a blue background")[0]
        negative = comfy.ConditioningZeroOut().zero_out(positive)[0]     # a real, different uncond; no 2nd encode
        return positive, negative


# --- a real headless server ---------------------------------------------------------------------------------------

@pytest.fixture()
def vae_loads(vae, monkeypatch):
    """What loading the VAE does while a test runs: ``moved`` gets an entry whenever one of the encoder's modules is
    moved (ComfyUI moves modules with ``.to()``, which goes through ``_apply``), ``loaded`` gets (ComfyUI's loaded
    size, the encoder's type) for every load of a patcher of this VAE. Undone after the test."""
    import comfy.model_management as mm
    encoder = vae.first_stage_model.encoder
    watch = types.SimpleNamespace(moved=[], loaded=[], encoder=encoder,
                                  decoder_only=mm.module_size(vae.first_stage_model) - mm.module_size(encoder))

    def counted(real):
        return lambda *args, **kwargs: watch.moved.append(1) or real(*args, **kwargs)
    for module in watch.encoder.modules():
        monkeypatch.setattr(module, "_apply", counted(module._apply))
    real_load = mm.load_models_gpu

    def load(models, *args, **kwargs):
        real_load(models, *args, **kwargs)
        watch.loaded.extend((m.loaded_size(), type(m.model.encoder)) for m in models
                            if m.model is vae.first_stage_model)
    monkeypatch.setattr(mm, "load_models_gpu", load)
    return watch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class ComfyServer:
    def __init__(self, url, proc, log_path, output_dir):
        self.url, self.proc, self.log_path, self.output_dir = url, proc, log_path, output_dir

    def log(self):
        return Path(self.log_path).read_text(errors="replace")

    def get_json(self, route):
        import json
        return json.loads(_get(self.url + route))

    def post_json(self, route, payload):
        """POST JSON; the JSON answer, or None for an empty one (POST /queue, /interrupt)."""
        import json
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body.strip() else None

    def run_prompt(self, prompt, timeout=300):
        """POST an API-format prompt and wait for its history entry; returns that entry."""
        pid = self.post_json("/prompt", {"prompt": prompt, "client_id": "rewardlab-tests"})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{pid}").get(pid)    # written once the prompt has finished
            if entry:
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} did not finish within {timeout} s:\n{self.log()[-3000:]}")


def start_server(root, model_files):
    """`main.py --cpu` on a free loopback port, with this repo symlinked into a custom_nodes dir given by an
    extra_model_paths yaml (plus the fixture model folders), everything else under ``root``. Returns a ComfyServer
    once it answers; stop it with ``stop_server``."""
    for sub in ("custom_nodes", "user", "input", "output"):
        (root / sub).mkdir(parents=True)
    os.symlink(REPO, root / "custom_nodes" / "rewardlab")
    yaml = root / "extra_model_paths.yaml"
    yaml.write_text(f"rewardlab_test:\n  base_path: {model_files}\n  diffusion_models: diffusion_models\n"
                    f"  text_encoders: text_encoders\n  vae: vae\n  loras: loras\n  checkpoints: checkpoints\n"
                    f"  custom_nodes: {root / 'custom_nodes'}\n")
    port = _free_port()
    log_path = root / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
           "--extra-model-paths-config", str(yaml), "--output-directory", str(root / "output"),
           "--input-directory", str(root / "input"), "--temp-directory", str(root),
           "--user-directory", str(root / "user"), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = ComfyServer(f"http://127.0.0.1:{port}", proc, log_path, root / "output")
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{srv.log()[-3000:]}")
        try:
            _get(srv.url + "/system_stats", timeout=2)
            return srv
        except OSError:
            if time.monotonic() > deadline:
                stop_server(srv)
                raise RuntimeError(f"ComfyUI did not start within 180 s:\n{srv.log()[-3000:]}")
            time.sleep(0.5)


def stop_server(srv):
    if srv.proc.poll() is not None:
        return
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()


@pytest.fixture(scope="session")
def server(model_files, tmp_path_factory):
    """A headless ComfyUI with the pack (start_server), stopped at session end."""
    srv = start_server(tmp_path_factory.mktemp("comfy_server"), model_files)
    try:
        yield srv
    finally:
        stop_server(srv)
