"""Server routes (host/routes.py) driven with aiohttp's test utilities, without ComfyUI."""
import asyncio
import io
import json

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from rewardlab import runtime
from rewardlab.host import routes, services
from rewardlab.training import status


def png(level, size=(16, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, (level, level, level)).save(buf, format="PNG")
    return buf.getvalue()


def call(requests):
    """Run ``requests(client)`` against an app carrying only our routes."""
    async def main():
        app = web.Application()
        app.add_routes(routes.register(web.RouteTableDef()))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await requests(client)
    return asyncio.run(asyncio.wait_for(main(), timeout=30))


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "bright.png").write_bytes(png(230))
    (tmp_path / "secret.png").write_bytes(png(10))
    monkeypatch.setattr(runtime.current(), "output_directory", lambda: str(out))
    return out


def test_not_registered_outside_comfyui():
    assert services.prompt_server_routes() is None
    assert routes.install() is False and routes._installed is False


def test_rewards_list(tmp_path, monkeypatch):
    monkeypatch.setenv("REWARDLAB_MODELS", str(tmp_path))
    (tmp_path / "sac+logos+ava1-l14-linearMSE.safetensors").write_bytes(b"x")

    async def requests(client):
        resp = await client.get("/rewardlab/rewards")
        assert resp.status == 200
        return {r["name"]: r for r in (await resp.json())["rewards"]}

    rewards = call(requests)
    assert rewards["brightness"]["weight_free"] and rewards["brightness"]["ready"]
    aesthetic = rewards["aesthetic-v2"]
    assert not aesthetic["weight_free"] and not aesthetic["ready"]  # the CLIP tower is missing
    assert {f["role"]: f["found"] for f in aesthetic["files"]} == {
        "clip": None, "head": "sac+logos+ava1-l14-linearMSE.safetensors"}


def test_training_status():
    status.clear()
    status.update("run-a", step=3, total=10, reward=0.25, last_checkpoint="loras/a_3.safetensors")
    status.update(record={"step": 4, "loss": -0.5, "reward": float("nan"), "note": "x"}, total=10)

    status.start("run-b-1", name="b", step=0)
    status.update("run-b-1", step=5, reward=0.5)
    status.start("run-b-2", name="b", step=0)    # the same name again: the first run's status is gone

    async def requests(client):
        all_runs = await (await client.get("/rewardlab/training")).json()
        one = await client.get("/rewardlab/training", params={"run": "run-a"})
        missing = await client.get("/rewardlab/training", params={"run": "nope"})
        by_name = await (await client.get("/rewardlab/training", params={"name": "b"})).json()
        return all_runs, one.status, await one.json(), missing.status, by_name

    all_runs, code, one, missing, by_name = call(requests)
    assert code == 200 and missing == 404
    assert by_name["run_id"] == "run-b-2" and by_name["step"] == 0 and "reward" not in by_name
    assert "run-b-1" not in all_runs["runs"]
    assert one["step"] == 3 and one["reward"] == 0.25 and one["last_checkpoint"] == "loras/a_3.safetensors"
    default = all_runs["runs"][status.DEFAULT_RUN]
    assert default["step"] == 4 and default["loss"] == -0.5 and default["reward"] is None and "note" not in default
    status.clear()


def test_score_upload_and_output_reference(output_dir):
    async def requests(client):
        form = FormData()
        form.add_field("reward", "brightness")
        form.add_field("prompt", "a grey square")
        form.add_field("image", png(51), filename="x.png", content_type="image/png")
        upload = await (await client.post("/rewardlab/score", data=form)).json()
        ref = await (await client.post("/rewardlab/score", json={
            "reward": "brightness", "filename": "bright.png", "subfolder": "sub"})).json()
        return upload, ref

    upload, ref = call(requests)
    assert upload["score"] == pytest.approx(0.2, abs=1e-3) and upload["prompt"] == "a grey square"
    assert ref["score"] == pytest.approx(230 / 255, abs=1e-3)


def test_score_rejects_bad_input_and_paths_outside_output(output_dir):
    async def post(client, **kw):
        resp = await client.post("/rewardlab/score", **kw)
        return resp.status, (await resp.json())["error"]

    bad_upload = FormData()
    bad_upload.add_field("reward", "brightness")
    bad_upload.add_field("image", b"not an image", filename="x.png", content_type="image/png")

    async def requests(client):
        return [
            await post(client, json={"reward": "brightness", "filename": "../secret.png"}),
            await post(client, json={"reward": "brightness", "filename": "secret.png", "subfolder": "../"}),
            await post(client, json={"reward": "brightness", "filename": str(output_dir.parent / "secret.png")}),
            await post(client, json={"reward": "brightness", "filename": "missing.png"}),
            await post(client, json={"reward": "brightness", "filename": "notes.txt"}),
            await post(client, json={"reward": "no-such-reward", "filename": "bright.png", "subfolder": "sub"}),
            await post(client, json={"reward": "aesthetic-v2", "filename": "bright.png", "subfolder": "sub"}),
            await post(client, data=b"not json", headers={"Content-Type": "application/json"}),
            await post(client, data=bad_upload),
        ]

    results = call(requests)
    codes = [code for code, _ in results]
    assert codes == [400, 400, 400, 400, 400, 404, 409, 400, 400]
    assert all("output folder" in msg for _, msg in results[:3])
    assert "not loaded" in results[6][1] and "weight-free" in results[6][1]
    assert "not a readable image" in results[8][1]


def png_claiming(width, height):
    """A small valid PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    data = bytearray(png(0, (4, 4)))
    ihdr = 8                                        # after the signature: length (4), b"IHDR" (4), data (13), CRC (4)
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21: ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4: ihdr + 21])))
    return bytes(data)


def test_score_answers_400_for_tiny_images_and_decompression_bombs(output_dir):
    """Issue 14: a 1x1 / 2x2 image with the sharpness reward and a PNG claiming 20000x20000 gave 500."""
    async def post(client, data, reward):
        form = FormData()
        form.add_field("reward", reward)
        form.add_field("image", data, filename="x.png", content_type="image/png")
        resp = await client.post("/rewardlab/score", data=form)
        return resp.status, (await resp.json())["error"]

    async def requests(client):
        return [await post(client, png(128, (1, 1)), "sharpness"), await post(client, png(128, (2, 2)), "sharpness"),
                await post(client, png_claiming(20000, 20000), "brightness"),
                await post(client, png_claiming(5000, 5000), "brightness")]

    results = call(requests)
    assert [code for code, _ in results] == [400] * 4
    assert "1x1 pixels are too small for this reward (at least 4x4)" in results[0][1]
    assert "2x2 pixels are too small" in results[1][1]
    assert all("too large to score" in msg and "downscale" in msg for _, msg in results[2:])


def test_score_of_a_reward_that_gives_nan_is_null_with_a_warning(output_dir, monkeypatch):
    """JSON has no NaN: a NaN score is sent as null with a warning, not as invalid JSON."""
    from rewardlab.rewards import registry

    nan_reward = registry.build_reward("brightness")
    nan_reward.score = lambda images, prompts: images.mean((1, 2, 3)) * float("nan")
    monkeypatch.setattr(routes, "ready_reward", lambda name: nan_reward)

    async def requests(client):
        resp = await client.post("/rewardlab/score", json={"reward": "brightness", "filename": "bright.png",
                                                           "subfolder": "sub"})
        return resp.status, await resp.text()

    code, text = call(requests)
    body = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert code == 200 and body["score"] is None and "returned NaN/Inf" in body["warning"]
