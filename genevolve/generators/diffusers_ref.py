"""A reference-conditioned diffusers generator: the program's references shape the image.

Three ways to condition, chosen with ``mode``:

- ``img2img`` (any pipeline ``AutoPipelineForImage2Image`` loads, e.g. SD/SDXL-Turbo): the first
  reference, resized to the output size, is the starting image and ``strength`` says how far the
  render may move from it; further references are not used (``last_notes`` says so).
- ``ip_adapter``: a text-to-image pipeline with IP-Adapter weights (``ip_adapter`` = repo id or
  folder, plus ``ip_adapter_subfolder`` / ``ip_adapter_weight``); every reference is an image prompt,
  weighted by ``ip_adapter_scale``.
- ``qwen_edit``: ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit), which takes several reference
  images at once, as the paper's open-generator setting does.

A program without references renders from text alone: ``img2img`` switches to the text-to-image
pipeline that shares its weights; ``ip_adapter`` sets the adapter scale to 0 for that render;
``qwen_edit`` edits a blank white canvas.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from ._diffusers import DiffusersBackend, dtype_kwargs

MODES = ("img2img", "ip_adapter", "qwen_edit")


class DiffusersReferenceGenerator(DiffusersBackend):
    def __init__(self, model: str | None = None, *, mode: str = "img2img", strength: float = 0.6,
                 ip_adapter: str | None = None, ip_adapter_subfolder: str = "models",
                 ip_adapter_weight: str = "ip-adapter_sd15.bin", ip_adapter_scale: float = 0.6,
                 true_cfg_scale: float = 4.0, **kwargs: Any):
        if mode not in MODES:
            raise ValueError(f"mode is one of {', '.join(MODES)}, not {mode!r}")
        if not 0 < strength <= 1:
            raise ValueError("strength must be in (0, 1]")
        if mode == "ip_adapter" and ip_adapter is None and kwargs.get("pipeline") is None:
            raise ValueError("mode 'ip_adapter' needs ip_adapter= (a repo id or folder with IP-Adapter weights)")
        if mode == "qwen_edit":
            kwargs.setdefault("steps", 40)
            kwargs.setdefault("guidance", 1.0)
        self.kind = mode
        super().__init__(model, **kwargs)
        self.mode = mode
        self.strength = float(strength)
        self.ip_adapter = ip_adapter
        self.ip_adapter_subfolder = ip_adapter_subfolder
        self.ip_adapter_weight = ip_adapter_weight
        self.ip_adapter_scale = float(ip_adapter_scale)
        self.true_cfg_scale = float(true_cfg_scale)
        self._text_pipe = None

    def _load(self, model: str, torch_dtype):
        if self.mode == "img2img":
            from diffusers import AutoPipelineForImage2Image

            return AutoPipelineForImage2Image.from_pretrained(model, **dtype_kwargs(torch_dtype))
        if self.mode == "ip_adapter":
            from diffusers import AutoPipelineForText2Image

            pipe = AutoPipelineForText2Image.from_pretrained(model, **dtype_kwargs(torch_dtype))
            pipe.load_ip_adapter(self.ip_adapter, subfolder=self.ip_adapter_subfolder, weight_name=self.ip_adapter_weight)
            return pipe
        import diffusers

        cls = getattr(diffusers, "QwenImageEditPlusPipeline", None) or getattr(diffusers, "QwenImageEditPipeline", None)
        if cls is None:
            raise ValueError(f"diffusers {diffusers.__version__} has no Qwen-Image-Edit pipeline; upgrade diffusers")
        return cls.from_pretrained(model, **dtype_kwargs(torch_dtype))

    @staticmethod
    def _rgb(image):
        if not hasattr(image, "convert"):
            from PIL import Image

            image = Image.fromarray(image)
        return image.convert("RGB")

    def generate(self, prompt: str, references: Sequence[Any] = (), seed: int = 0):
        pipe = self.pipe
        if self.mode == "img2img" and "strength" not in inspect.signature(pipe.__call__).parameters:
            pipe = self._pipe = self._image_pipeline(pipe)  # a text-to-image pipeline was given: share its weights
        refs = [self._rgb(r) for r in references]
        common = dict(prompt=prompt, num_inference_steps=self.steps, generator=self._torch_generator(seed))
        self.last_notes = []
        if self.mode == "img2img":
            if not refs:
                self.last_notes.append("no reference: rendered from text with the shared text-to-image pipeline")
                return self._call(self._text_pipeline(pipe), guidance_scale=self.guidance, **common, **self._size_kwargs())
            w, h = self._target_size(pipe)
            if len(refs) > 1:
                self.last_notes.append(f"image-to-image starts from the first reference; {len(refs) - 1} more not used")
            return self._call(pipe, image=refs[0].resize((w, h)), strength=self.strength, guidance_scale=self.guidance,
                              **common)
        if self.mode == "ip_adapter":
            w, h = self._target_size(pipe)
            pipe.set_ip_adapter_scale(self.ip_adapter_scale if refs else 0.0)
            if not refs:
                from PIL import Image

                self.last_notes.append("no reference: IP-Adapter scale 0 for this render")
                refs = [Image.new("RGB", (224, 224), "white")]
            return self._call(pipe, ip_adapter_image=[refs], guidance_scale=self.guidance, **common,
                              **self._size_kwargs())
        if not refs:
            from PIL import Image

            w, h = self.width or 1024, self.height or 1024
            self.last_notes.append("no reference: edited a blank white canvas")
            refs = [Image.new("RGB", (int(w), int(h)), "white")]
        return self._call(pipe, image=refs, negative_prompt=" ", true_cfg_scale=self.true_cfg_scale,
                          guidance_scale=self.guidance, **common, **self._size_kwargs())

    @staticmethod
    def _image_pipeline(pipe):
        from diffusers import AutoPipelineForImage2Image

        out = AutoPipelineForImage2Image.from_pipe(pipe)
        if hasattr(out, "set_progress_bar_config"):
            out.set_progress_bar_config(disable=True)
        return out

    def _text_pipeline(self, pipe):
        if self._text_pipe is None:
            from diffusers import AutoPipelineForText2Image

            self._text_pipe = AutoPipelineForText2Image.from_pipe(pipe)
            if hasattr(self._text_pipe, "set_progress_bar_config"):
                self._text_pipe.set_progress_bar_config(disable=True)
        return self._text_pipe
