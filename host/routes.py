"""RewardLab's HTTP routes on ComfyUI's server (also mirrored under ``/api/...`` by ComfyUI):

- ``GET  /rewardlab/rewards``  reward models, whether their weight files are present, and which are loaded;
- ``GET  /rewardlab/training`` training run status (step, reward, last checkpoint), ``?run=ID`` for one run,
  ``?name=NAME`` for the latest run of that name (a new run of a name replaces the old one's status);
- ``POST /rewardlab/score``    score one image with a weight-free or already loaded reward. The image is an
  upload (multipart field ``image``) or a file of ComfyUI's output folder (JSON ``{"filename", "subfolder"}``);
  other fields: ``reward`` (name), ``prompt`` (text). Nothing outside the output/model folders is ever read.

Routes are registered only inside a running ComfyUI server (services.prompt_server_routes); importing the pack
anywhere else registers nothing. The handlers take plain aiohttp requests, so tests drive them without ComfyUI.
"""
import asyncio
import io
import json
import os

from aiohttp import web

from .. import runtime
from . import services

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _error(status, message):
    return web.json_response({"error": message}, status=status)


# --- GET /rewardlab/rewards -----------------------------------------------------------------------------------

def reward_catalogue():
    from ..rewards import registry

    folders = runtime.current().reward_folders()
    loaded = {}
    for name, device, dtype in registry.cached():
        loaded.setdefault(name, []).append({"device": device, "dtype": dtype})
    out = []
    for name in registry.list_rewards():
        spec = registry.get_spec(name)
        files = []
        for wf in spec.files:
            path = registry.find_file(spec, wf, folders)
            files.append({"role": wf.role, "accepted_names": list(wf.names), "found": os.path.basename(path) if path else None})
        out.append({"name": name, "description": spec.description, "licence": spec.licence,
                    "weight_free": not spec.files, "files": files, "ready": all(f["found"] for f in files),
                    "loaded": loaded.get(name, [])})
    return out


async def get_rewards(request):
    return web.json_response({"rewards": reward_catalogue()})


# --- GET /rewardlab/training ----------------------------------------------------------------------------------

async def get_training(request):
    from ..training import status

    run, name = request.query.get("run"), request.query.get("name")
    if run is None and name is None:
        return web.json_response({"runs": status.snapshot()})
    entry = status.snapshot(run) if run is not None else status.latest(name)
    if entry is None:
        known = sorted({e.get("name") or rid for rid, e in status.snapshot().items()})
        return _error(404, f"no training run {run or name!r}; known: {known}")
    return web.json_response(entry)


# --- POST /rewardlab/score ------------------------------------------------------------------------------------

def output_file(filename, subfolder=""):
    """Absolute path of an existing image in ComfyUI's output folder; ValueError for anything else."""
    if not isinstance(filename, str) or not filename or not isinstance(subfolder, str):
        raise ValueError("'filename' (and optional 'subfolder') must be strings naming an output image")
    if not filename.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"only image files can be scored ({', '.join(IMAGE_SUFFIXES)})")
    root = os.path.realpath(runtime.current().output_directory())
    path = os.path.realpath(os.path.join(root, subfolder, filename))
    if os.path.commonpath([root, path]) != root:
        raise ValueError("the image must lie inside ComfyUI's output folder")
    if not os.path.isfile(path):
        raise ValueError(f"no such output image: {os.path.join(subfolder, filename)}")
    return path


def decode_image(data):
    """Bytes -> float BCHW [0, 1] tensor (1, 3, H, W). Non-images, images whose header claims more than MAX_PIXELS
    (checked before any pixel is decoded: decompression bombs) and broken files are ValueErrors."""
    import warnings

    import numpy as np
    import torch
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ValueError(f"image of {img.width}x{img.height} pixels is too large to score (at most "
                                     f"{MAX_PIXELS} pixels): downscale it first")
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        except ValueError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"image is too large to score (at most {MAX_PIXELS} pixels): downscale it first") from None
        except Exception as e:      # anything PIL raises on a broken or hostile file is bad input, not a server fault
            detail = str(e).splitlines()[0][:200] if str(e) else ""
            raise ValueError(f"not a readable image ({type(e).__name__}: {detail})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def ready_reward(name):
    """A weight-free reward (built on demand) or one already loaded by a node; never loads weights here."""
    from ..rewards import registry

    if not isinstance(name, str) or name not in registry.list_rewards():
        raise LookupError(f"unknown reward {name!r}; available: {', '.join(registry.list_rewards())}")
    if name in registry.list_rewards(weight_free=True):
        return registry.load_reward(name, device="cpu")
    for cached_name, device, dtype in registry.cached():
        if cached_name == name:
            import torch

            return registry.load_reward(name, device=device, dtype=getattr(torch, dtype.replace("torch.", "")))
    raise PermissionError(f"reward {name!r} is not loaded: load it once with a 'Load Reward Model' node, "
                          f"or score with a weight-free reward ({', '.join(registry.list_rewards(weight_free=True))})")


async def _read_score_request(request):
    """(reward name, prompt, image bytes) from a multipart upload or a JSON reference to an output file."""
    if request.content_type.startswith("multipart/"):
        fields, data = {}, None
        reader = await request.multipart()
        async for part in reader:
            if part.name == "image":
                data = bytearray()
                while chunk := await part.read_chunk():
                    data += chunk
                    if len(data) > MAX_IMAGE_BYTES:
                        raise ValueError(f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB")
                data = bytes(data)
            elif part.name in ("reward", "prompt"):
                fields[part.name] = (await part.text())[:4096]
        if data is None:
            raise ValueError("multipart request without an 'image' file field")
        return fields.get("reward"), fields.get("prompt", ""), data
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("send multipart form data (image, reward, prompt) or JSON "
                         "{reward, prompt, filename, subfolder}") from None
    if not isinstance(body, dict):
        raise ValueError("JSON body must be an object")
    path = output_file(body.get("filename"), body.get("subfolder", ""))
    with open(path, "rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    return body.get("reward"), prompt[:4096], data


def _score(name, prompt, data):
    """The score, or None when the reward gave NaN/Inf (JSON has no NaN)."""
    import math

    import torch

    image = decode_image(data)
    reward = ready_reward(name)
    with torch.no_grad():
        value = float(reward(image, [prompt]).reshape(-1)[0])
    return value if math.isfinite(value) else None


async def post_score(request):
    try:
        name, prompt, data = await _read_score_request(request)
        if name is None:
            raise ValueError("missing 'reward' (a reward model name, see GET /rewardlab/rewards)")
        loop = asyncio.get_running_loop()  # decoding and the forward pass stay off the server's event loop
        score = await loop.run_in_executor(None, _score, name, prompt, data)
    except ValueError as e:
        return _error(400, str(e))
    except LookupError as e:
        return _error(404, str(e).strip("'\""))
    except PermissionError as e:
        return _error(409, str(e))
    body = {"reward": name, "prompt": prompt, "score": score}
    if score is None:
        body["warning"] = f"reward {name!r} returned NaN/Inf for this image"
    return web.json_response(body)


# --- registration ---------------------------------------------------------------------------------------------

ROUTES = (("GET", "/rewardlab/rewards", get_rewards), ("GET", "/rewardlab/training", get_training),
          ("POST", "/rewardlab/score", post_score))
_installed = False


def register(routes):
    """Add the handlers to an aiohttp RouteTableDef (ComfyUI's PromptServer.instance.routes, or a test's)."""
    for method, path, handler in ROUTES:
        routes.route(method, path)(handler)
    return routes


def install():
    """Register on ComfyUI's server when one exists; a no-op (False) anywhere else. Idempotent."""
    global _installed
    if _installed:
        return True
    routes = services.prompt_server_routes()
    if routes is None:
        return False
    register(routes)
    _installed = True
    return True

