"""Editor-format -> API-format conversion (batch/convert.py), checked against prompts written by hand from the
frontend's graphToPrompt rules."""
import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # pytest runs with --import-mode=importlib
from _batch_fixtures import object_info, txt2img_api
from rewardlab.batch.convert import WorkflowError, is_api_format, is_editor_format, load_workflow, to_api
from rewardlab.batch.text import dynamic_prompt, format_date, replace_text
from rewardlab.batch.widgets import read_widget_values, widget_layout


def node(nid, kind, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    n = {"id": nid, "type": kind, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": 0, "mode": mode,
         "inputs": [dict(name=a, type=b, link=c, **({"widget": {"name": a}} if w else {}))
                    for a, b, c, *w in inputs],
         "outputs": [{"name": a, "type": b, "links": c, "slot_index": i} for i, (a, b, c) in enumerate(outputs)],
         "properties": {"Node name for S&R": kind}}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


def editor_workflow():
    """A graph with every frontend-only construct: a bypassed LoRA loader, Reroutes, a PrimitiveNode feeding the
    seed through a Reroute, muted nodes (one feeding a live node), a Note and a group."""
    nodes = [
        node(4, "CheckpointLoaderSimple", outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2]), ("VAE", "VAE", [3, 16])],
             widgets=["tiny.safetensors"]),
        node(10, "LoraLoader", inputs=[("model", "MODEL", 1), ("clip", "CLIP", 2)],
             outputs=[("MODEL", "MODEL", [4]), ("CLIP", "CLIP", [5, 6])], widgets=["reward.safetensors", 0.8, 0.8], mode=4),
        node(11, "Reroute", inputs=[("", "*", 4)], outputs=[("", "MODEL", [7])]),
        node(6, "CLIPTextEncode", inputs=[("clip", "CLIP", 5)], outputs=[("CONDITIONING", "CONDITIONING", [10])],
             widgets=["a cat // a comment\n, {red|red} fur /* block */"], title="Positive"),
        node(7, "CLIPTextEncode", inputs=[("clip", "CLIP", 6)], outputs=[("CONDITIONING", "CONDITIONING", [11])],
             widgets=["blurry"]),
        node(5, "EmptyLatentImage", outputs=[("LATENT", "LATENT", [12])], widgets=[64, 48, 2]),
        node(12, "PrimitiveNode", outputs=[("INT", "INT", [8])], widgets=[42, "fixed"], title="Seed"),
        node(13, "Reroute", inputs=[("", "*", 8)], outputs=[("", "INT", [9])]),
        node(3, "KSampler", inputs=[("model", "MODEL", 7), ("positive", "CONDITIONING", 10),
                                    ("negative", "CONDITIONING", 11), ("latent_image", "LATENT", 12),
                                    ("seed", "INT", 9, True)],
             outputs=[("LATENT", "LATENT", [13])], widgets=[0, "randomize", 4, 6.5, "euler", "karras", 1]),
        node(8, "VAEDecode", inputs=[("samples", "LATENT", 13), ("vae", "VAE", 3)], outputs=[("IMAGE", "IMAGE", [14, 15])]),
        node(9, "SaveImage", inputs=[("images", "IMAGE", 14)], widgets=["rl"]),
        node(14, "PreviewImage", inputs=[("images", "IMAGE", 15)], mode=2),
        node(16, "VAEDecode", inputs=[("samples", "LATENT", None), ("vae", "VAE", 16)],
             outputs=[("IMAGE", "IMAGE", [17])], mode=2),
        node(17, "SaveImage", inputs=[("images", "IMAGE", 17)], widgets=["from_muted"]),
        node(15, "Note", widgets=["Replace the checkpoint name with yours."]),
    ]
    links = [[1, 4, 0, 10, 0, "MODEL"], [2, 4, 1, 10, 1, "CLIP"], [3, 4, 2, 8, 1, "VAE"], [4, 10, 0, 11, 0, "MODEL"],
             [5, 10, 1, 6, 0, "CLIP"], [6, 10, 1, 7, 0, "CLIP"], [7, 11, 0, 3, 0, "MODEL"], [8, 12, 0, 13, 0, "INT"],
             [9, 13, 0, 3, 4, "INT"], [10, 6, 0, 3, 1, "CONDITIONING"], [11, 7, 0, 3, 2, "CONDITIONING"],
             [12, 5, 0, 3, 3, "LATENT"], [13, 3, 0, 8, 0, "LATENT"], [14, 8, 0, 9, 0, "IMAGE"],
             [15, 8, 0, 14, 0, "IMAGE"], [16, 4, 2, 16, 1, "VAE"], [17, 16, 0, 17, 0, "IMAGE"]]
    return {"last_node_id": 17, "last_link_id": 17, "nodes": nodes, "links": links,
            "groups": [{"title": "Sampling", "bounding": [0, 0, 800, 400], "color": "#3f789e", "font_size": 24,
                        "flags": {}}],
            "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}


EXPECTED = {
    "4": {"inputs": {"ckpt_name": "tiny.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "6": {"inputs": {"text": "a cat \n, red fur ", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "Positive"}},
    "7": {"inputs": {"text": "blurry", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "5": {"inputs": {"width": 64, "height": 48, "batch_size": 2}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "3": {"inputs": {"seed": 42, "steps": 4, "cfg": 6.5, "sampler_name": "euler", "scheduler": "karras", "denoise": 1,
                     "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]},
          "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode", "_meta": {"title": "VAE Decode"}},
    "9": {"inputs": {"filename_prefix": "rl", "images": ["8", 0]}, "class_type": "SaveImage",
          "_meta": {"title": "Save Image"}},
    "17": {"inputs": {"filename_prefix": "from_muted"}, "class_type": "SaveImage", "_meta": {"title": "Save Image"}},
}


def test_editor_graph_converts_like_graph_to_prompt():
    wf = editor_workflow()
    assert is_editor_format(wf) and not is_api_format(wf)
    assert to_api(wf, object_info()) == EXPECTED


def names(info, class_type=None):
    return [w.name for w in widget_layout(info, class_type) if w.saved]


# Specs as ComfyUI v0.3.64's /object_info reports them (LoadImageMask, a remote combo as LoadImageOutput has).
LOAD_IMAGE_MASK = {"input": {"required": {"image": [[], {"image_upload": True}],
                                          "channel": [["alpha", "red", "green", "blue"]]}},
                   "input_order": {"required": ["image", "channel"]}}
LOAD_IMAGE_OUTPUT = {"input": {"required": {"image": ["COMBO", {"image_upload": True, "remote": {
    "route": "/internal/files/output", "refresh_button": True}}]}}, "input_order": {"required": ["image"]}}


def test_widget_layout_follows_the_frontend():
    info = object_info()
    assert names(info["KSampler"]) == ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler",
                                       "denoise"]
    assert names(info["RandomNoise"]) == ["noise_seed", "control_after_generate"]
    assert names(info["LoadImage"], "LoadImage") == ["image", "upload"]
    assert names(info["KSamplerAdvanced"])[:4] == ["add_noise", "noise_seed", "control_after_generate", "steps"]
    # the upload button comes after every input the input order names (uploadImage.ts adds it to the end)
    assert names(LOAD_IMAGE_MASK, "LoadImageMask") == ["image", "channel", "upload"]
    assert names(LOAD_IMAGE_OUTPUT, "LoadImageOutput") == ["image", "Auto-refresh after generation", "refresh",
                                                           "upload"]
    # Load3D: its extension's buttons sit between model_file and the viewer
    load3d = {"input": {"required": {"model_file": [[], {"file_upload": True}], "image": ["LOAD_3D", {}],
                                     "width": ["INT", {"default": 1024}], "height": ["INT", {"default": 1024}]}}}
    assert names(load3d, "Load3D") == ["model_file", "upload 3d model", "upload extra resources", "clear", "image",
                                       "width", "height"]
    # an INT named seed gets no control widget when its spec says so
    no_control = {"input": {"required": {"seed": ["INT", {"control_after_generate": False}]}}}
    assert names(no_control) == ["seed"]
    wf = {"nodes": [node(1, "LoadImage", outputs=[("IMAGE", "IMAGE", [1]), ("MASK", "MASK", None)],
                         widgets=["example.png", "image"]),
                    node(2, "PreviewImage", inputs=[("images", "IMAGE", 1)])],
          "links": [[1, 1, 0, 2, 0, "IMAGE"]]}
    assert to_api(wf, info)["1"]["inputs"] == {"image": "example.png"}


def test_values_that_do_not_fit_are_refused_never_shifted():
    """The old converter's LoadImageMask mistake (upload counted after image) and a wrong count are refused with
    the node, the expected widget order and the saved values."""
    values = read_widget_values(["example.png", "alpha", "image"], LOAD_IMAGE_MASK, "LoadImageMask", "node 3")
    assert values == {"image": "example.png", "channel": "alpha"}
    info = object_info()
    wf = {"nodes": [node(1, "EmptyLatentImage", outputs=[("LATENT", "LATENT", [])], widgets=[256]),
                    node(2, "SaveImage", inputs=[("images", "IMAGE", None)], widgets=["x"])], "links": []}
    with pytest.raises(WorkflowError) as e:
        to_api(wf, info)
    assert "node 1 (EmptyLatentImage): 1 saved widget values for 3 widgets" in str(e.value)
    assert "['width', 'height', 'batch_size']" in str(e.value) and "[256]" in str(e.value)
    sampler = {"nodes": [node(3, "KSampler", widgets=[5, 20, 7.0, "euler", "normal", 1.0, "fixed"])], "links": []}
    with pytest.raises(WorkflowError, match="20 is not a control_after_generate mode"):
        to_api(sampler, info)
    with pytest.raises(Exception, match="not an integer"):
        read_widget_values(["a.png", "x"], {"input": {"required": {"image": [[], {}], "n": ["INT", {}]}}},
                           None, "node 1")


def test_missing_values_take_defaults_only_when_none_were_saved_and_dict_values_work():
    info = object_info()
    wf = {"nodes": [node(1, "EmptyLatentImage", outputs=[("LATENT", "LATENT", [])], widgets=[]),
                    node(2, "SaveImage", inputs=[("images", "IMAGE", None)]),
                    node(3, "EmptyLatentImage", outputs=[("LATENT", "LATENT", [])],
                         widgets={"width": 128, "height": 96})], "links": []}
    api = to_api(wf, info)
    assert api["1"]["inputs"] == {"width": 512, "height": 512, "batch_size": 1}
    assert api["2"]["inputs"] == {"filename_prefix": "ComfyUI"}
    assert api["3"]["inputs"] == {"width": 128, "height": 96}


def test_values_saved_by_widget_index_with_holes_are_read():
    """The editor writes widgets_values by widget index, leaving null where an unsaved widget sits (LoadAudio's
    player between the file and the upload button)."""
    load_audio = {"input": {"required": {"audio": [["a.wav"], {"audio_upload": True}]}},
                  "input_order": {"required": ["audio"]}}
    assert [(w.name, w.saved) for w in widget_layout(load_audio, "LoadAudio")] == [
        ("audio", True), ("audioUI", False), ("upload", True)]
    assert read_widget_values(["a.wav", None, ""], load_audio, "LoadAudio", "node 1") == {"audio": "a.wav"}
    assert read_widget_values(["a.wav", ""], load_audio, "LoadAudio", "node 1") == {"audio": "a.wav"}


def test_text_replacement_rules():
    now = __import__("datetime").datetime(2024, 3, 9, 7, 5, 1)
    assert format_date("yyyy-MM-dd hh:mm:ss", now) == "2024-03-09 07:05:01"
    assert format_date("yy M d h m s", now) == "24 3 9 7 5 1"
    lookup = {("KSampler", "seed"): 12, ("Pos", "text"): 'a/b:c"d'}.get
    find = lambda node, widget: lookup((node, widget))
    assert replace_text("%date:yyyy%/%KSampler.seed%_%Pos.text%", find, now) == "2024/12_a_b_c_d"
    # as in the editor: one '.' makes a node lookup, more cut the format at the first '.'
    assert replace_text("%width%x%height% %Nope.x% %date:yyyy.MM% %date:yyyy.MM.dd%", find, now) == \
        "%width%x%height% %Nope.x% %date:yyyy.MM% 2024"


def test_bypass_passes_the_first_input_of_the_wanted_type():
    """A bypassed KSampler: its LATENT output is served by its latent_image input (slot 3, not slot 0)."""
    info = object_info()
    wf = editor_workflow()
    next(n for n in wf["nodes"] if n["id"] == 3)["mode"] = 4
    api = to_api(wf, info)
    assert "3" not in api and api["8"]["inputs"]["samples"] == ["5", 0]


def test_api_format_passes_through_and_errors_name_the_fix(tmp_path):
    api = txt2img_api()
    assert to_api(api, object_info()) == api and to_api(api, object_info()) is not api
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompt": api, "client_id": "x"}))
    assert load_workflow(str(body)) == api
    wf = editor_workflow()
    wf["nodes"][0]["type"] = "NotInstalledNode"
    with pytest.raises(WorkflowError, match="install the custom node pack"):
        to_api(wf, object_info())
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        to_api({"hello": 1}, object_info())


def test_png_metadata_is_read(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("prompt", json.dumps(txt2img_api(seed=7)))
    meta.add_text("workflow", json.dumps(editor_workflow()))
    path = tmp_path / "out.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=meta)
    assert load_workflow(str(path))["3"]["inputs"]["seed"] == 7


def test_dynamic_prompts():
    rng = random.Random(0)
    picks = {dynamic_prompt("a {red|green|blue} ball", rng) for _ in range(60)}
    assert picks == {"a red ball", "a green ball", "a blue ball"}
    nested = {dynamic_prompt("{x|{y|z}}!", rng) for _ in range(60)}
    assert nested == {"x!", "y!", "z!"}
    assert dynamic_prompt("keep \\{this\\} /* gone */text // gone too", rng) == "keep \\{this\\} text "


def test_links_saved_as_objects_convert_the_same():
    """Workflow schema 1.0 stores links as objects instead of rows."""
    wf = editor_workflow()
    wf["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), row))
                   for row in wf["links"]]
    assert to_api(wf, object_info()) == EXPECTED
