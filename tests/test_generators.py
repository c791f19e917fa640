"""Diffusers generators on tiny random-weight pipelines (CPU, no download), and the render service."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from genevolve.generators import GeneratorError, GeneratorTimeout, open_generator
from genevolve.generators.diffusers_ref import DiffusersReferenceGenerator
from genevolve.generators.diffusers_t2i import DiffusersTextToImage
from genevolve.generators.render_service import RenderServiceGenerator, image_to_data_uri

from _loopback import free_port_url, serve_app


@pytest.fixture(scope="module")
def tiny_pipe():
    from genevolve.generators.tiny import build_tiny_sd

    return build_tiny_sd(seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_pipe):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipe.save_pretrained(folder)
    return folder


def _arr(im):
    return np.asarray(im, dtype=np.int16)


def test_text_to_image_is_seeded_and_ignores_references(tiny_pipe):
    gen = DiffusersTextToImage(pipeline=tiny_pipe, steps=2, device="cpu")
    a, b, c = gen.generate("a red kite", seed=1), gen.generate("a red kite", seed=1), gen.generate("a red kite", seed=2)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert (_arr(a) == _arr(b)).all() and (_arr(a) != _arr(c)).any()
    gen.generate("a red kite", [Image.new("RGB", (8, 8))], seed=1)
    assert "not used" in gen.last_notes[0]
    assert gen.device.type == "cpu" and str(gen.dtype) == "torch.float32"


def test_loads_a_local_folder_and_uses_the_reference(tiny_folder):
    t2i = DiffusersTextToImage(str(tiny_folder), steps=2)
    assert t2i.generate("a tower", seed=0).size == (32, 32)
    ref = DiffusersReferenceGenerator(str(tiny_folder), mode="img2img", steps=2, strength=0.5)
    red, blue = Image.new("RGB", (40, 40), (230, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 230))
    out_red, out_blue = ref.generate("a tower", [red], seed=0), ref.generate("a tower", [blue], seed=0)
    # the starting image shows through: the red reference gives a redder image than the blue one
    assert _arr(out_red)[..., 0].mean() > _arr(out_blue)[..., 0].mean()
    assert ref.generate("a tower", [red, blue], seed=0) and "1 more not used" in ref.last_notes[0]
    assert ref.generate("a tower", [], seed=0).size == (32, 32) and "from text" in ref.last_notes[0]


def test_timeout_and_missing_model(tiny_pipe):
    with pytest.raises(GeneratorTimeout, match="exceeded"):
        DiffusersTextToImage(pipeline=tiny_pipe, steps=2, timeout_s=0.0).generate("x")
    with pytest.raises(GeneratorError, match="could not load diffusers pipeline '/no/such/model'"):
        DiffusersTextToImage("/no/such/model").generate("x")
    with pytest.raises(ValueError, match="needs a model"):
        open_generator("t2i")


class RecordingPipe:
    """Stands in for IP-Adapter and Qwen-Image-Edit pipelines (too large to build in a test)."""

    def __init__(self):
        self.calls, self.scales = [], []

    def __call__(self, prompt, num_inference_steps, generator, image=None, ip_adapter_image=None, negative_prompt=None,
                 true_cfg_scale=None, guidance_scale=None, width=None, height=None, callback_on_step_end=None):
        self.calls.append(dict(prompt=prompt, image=image, ip_adapter_image=ip_adapter_image, steps=num_inference_steps,
                               true_cfg_scale=true_cfg_scale))
        return type("Out", (), {"images": [Image.new("RGB", (16, 16), "green")]})()

    def set_ip_adapter_scale(self, s):
        self.scales.append(s)


def test_ip_adapter_and_qwen_edit_pass_every_reference():
    refs = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]
    pipe = RecordingPipe()
    ip = DiffusersReferenceGenerator(pipeline=pipe, mode="ip_adapter", ip_adapter_scale=0.7, width=64, height=64)
    ip.generate("p", refs)
    ip.generate("p", [])
    assert [len(c["ip_adapter_image"][0]) for c in pipe.calls] == [2, 1] and pipe.scales == [0.7, 0.0]
    pipe = RecordingPipe()
    qe = DiffusersReferenceGenerator(pipeline=pipe, mode="qwen_edit", width=64, height=64)
    qe.generate("p", refs)
    qe.generate("p", [])
    assert len(pipe.calls[0]["image"]) == 2 and pipe.calls[0]["steps"] == 40 and pipe.calls[0]["true_cfg_scale"] == 4.0
    assert pipe.calls[1]["image"][0].size == (64, 64) and "blank" in qe.last_notes[0]
    with pytest.raises(ValueError, match="ip_adapter="):
        DiffusersReferenceGenerator("some/model", mode="ip_adapter")


# ---------------------------------------------------------------------------
# render service: client (MockTransport) and server (loopback uvicorn)
# ---------------------------------------------------------------------------


def _png_b64(color="red"):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_client_round_robin_retries_and_errors():
    seen = []

    def handler(req: httpx.Request):
        seen.append(str(req.url))
        if req.url.host == "a":
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"success": True, "image": _png_b64()})

    client = RenderServiceGenerator(["http://a:1", "http://b:2/generate"], backoff=0, transport=httpx.MockTransport(handler))
    im = client.generate("p", [Image.new("RGB", (3, 3))], seed=4)
    assert im.getpixel((0, 0)) == (255, 0, 0)
    assert seen == ["http://a:1/generate", "http://b:2/generate"]

    for body, needle in (({"success": False, "error": "OOM"}, "OOM"), ({"success": True, "image": "!!"}, "not base64"),
                         ({"success": True}, "no 'image'")):
        bad = RenderServiceGenerator("http://a:1", backoff=0, max_retries=1,
                                     transport=httpx.MockTransport(lambda r, b=body: httpx.Response(200, json=b)))
        with pytest.raises(GeneratorError, match=needle):
            bad.generate("p")
    refused = RenderServiceGenerator("http://a:1", backoff=0, transport=httpx.MockTransport(lambda r: httpx.Response(400, text="no")))
    with pytest.raises(GeneratorError, match="refused"):
        refused.generate("p")

    def slow(req):
        raise httpx.ReadTimeout("slow", request=req)

    with pytest.raises(GeneratorTimeout, match="timed out"):
        RenderServiceGenerator("http://a:1", backoff=0, max_retries=1, timeout=5, transport=httpx.MockTransport(slow)).generate("p")


def test_render_service_end_to_end_with_the_sandbox(world):
    from genevolve.serving.render import build_render_app

    app = build_render_app(world.generator)
    with serve_app(app) as url:
        dead = free_port_url()
        client = RenderServiceGenerator([dead, url], backoff=0, max_retries=2)
        ref = world.ref_image(next(iter(world.refs)))
        prompt = "exactly three gold stars in the top of the image. the flag from the first reference image in the center of the image."
        remote = client.generate(prompt, [ref], seed=3)
        local = world.generator.generate(prompt, [ref], seed=3)
        assert (np.asarray(remote) == np.asarray(local)).all()  # PNG is lossless: the same pixels

        r = httpx.post(f"{url}/generate", json={"prompt": "x", "image_urls": ["http://example.com/a.png"]})
        assert r.status_code == 400 and r.json()["success"] is False and "data: URI" in r.json()["error"]
        r = httpx.post(f"{url}/generate", json={"image_urls": []})
        assert r.status_code == 400 and "prompt" in r.json()["error"]
        r = httpx.post(f"{url}/generate", json={"prompt": "x", "image_urls": ["data:image/png;base64,AAAA"]})
        assert r.status_code == 400 and "not a readable image" in r.json()["error"]


def test_render_server_reports_generator_failures():
    from fastapi.testclient import TestClient

    from genevolve.serving.render import build_render_app

    class Broken:
        name = "broken"

        def generate(self, prompt, references=(), seed=0):
            raise RuntimeError("CUDA out of memory")

    r = TestClient(build_render_app(Broken())).post("/generate", json={"prompt": "x", "image_urls": [image_to_data_uri(Image.new("RGB", (2, 2)))]})
    assert r.status_code == 500 and "CUDA out of memory" in r.json()["error"]
