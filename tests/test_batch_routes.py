"""Server routes (host/routes.py) driven with aiohttp's test utilities, without ComfyUI."""
import asyncio
import io

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
