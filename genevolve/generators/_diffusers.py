"""What every diffusers backend shares: lazy loading, device and dtype at run time, seeds, time limits."""

from __future__ import annotations

import abc
import inspect
import os
import time
from typing import Any

from . import GeneratorError, GeneratorTimeout


def dtype_kwargs(torch_dtype) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` in new diffusers, ``torch_dtype`` in old ones."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": torch_dtype}


def _device_and_dtype(device: str | None, dtype: str | None):
    from ..policies.local import pick_device, pick_dtype

    dev = pick_device(device)
    if dtype is None and dev.type == "cuda":
        dtype = "bfloat16" if __import__("torch").cuda.is_bf16_supported() else "float16"
    return dev, pick_dtype(dev, dtype)


class DiffusersBackend(abc.ABC):
    """Holds one pipeline, built on first use from ``model`` (a hub id or a local folder) or given ready.

    ``timeout_s`` bounds one render: checked after every denoising step (pipelines that take
    ``callback_on_step_end``) and once at the end, raising :class:`GeneratorTimeout`.
    """

    kind = "diffusers"

    def __init__(self, model: str | None = None, *, pipeline: Any = None, device: str | None = None,
                 dtype: str | None = None, steps: int = 4, guidance: float = 0.0, width: int | None = None,
                 height: int | None = None, timeout_s: float | None = None, name: str | None = None,
                 extra: dict[str, Any] | None = None):
        if model is None and pipeline is None:
            raise ValueError("give a model id or folder, or a ready pipeline")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.model = model
        self._pipe = pipeline
        self._device_arg, self._dtype_arg = device, dtype
        self.device = None
        self.dtype = None
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.width, self.height = width, height
        self.timeout_s = timeout_s
        self.extra = dict(extra or {})
        self.name = name or f"{self.kind}:{model or type(pipeline).__name__}"
        self.last_notes: list[str] = []  # what the last render did with the references

    # -- loading -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self, model: str, torch_dtype):
        """The backend's pipeline for ``model`` (a model id or local folder) in ``torch_dtype``."""

    def _placed(self, pipe):
        import torch

        if hasattr(pipe, "to") and self.device is not None:
            # Cast only when asked to or on a GPU: a float32 pipeline on the CPU stays as it is.
            cast = self._dtype_arg is not None or (self.device.type != "cpu" and self.dtype != torch.float32)
            if not cast:
                return self._quiet(pipe.to(self.device))
            try:
                pipe = pipe.to(self.device, self.dtype) if self.dtype is not None else pipe.to(self.device)
            except TypeError:  # a pipeline whose .to takes the device only
                pipe = pipe.to(self.device)
        return self._quiet(pipe)

    @staticmethod
    def _quiet(pipe):
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def pipe(self):
        if self.device is None:
            self.device, self.dtype = _device_and_dtype(self._device_arg, self._dtype_arg)
            if self._pipe is not None:
                self._pipe = self._placed(self._pipe)
        if self._pipe is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                pipe = self._load(self.model, self.dtype)
            except (OSError, ValueError, EnvironmentError) as exc:
                raise GeneratorError(
                    f"could not load diffusers pipeline {self.model!r} ({type(exc).__name__}: {exc}); give a local "
                    "folder written by save_pretrained, or a hub id already in the local cache (the hub is offline)"
                ) from exc
            self._pipe = self._placed(pipe)
        return self._pipe

    # -- one render --------------------------------------------------------------------------
    def _torch_generator(self, seed: int):
        import torch

        dev = self.device if self.device is not None and self.device.type != "mps" else "cpu"
        return torch.Generator(device=dev).manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)

    def _call(self, pipe, **kwargs: Any):
        """Run the pipeline with the time limit and return its first image (PIL, RGB)."""
        start = time.monotonic()
        limit = self.timeout_s

        def on_step(_pipe, step, _t, callback_kwargs):
            if limit is not None and time.monotonic() - start > limit:
                raise GeneratorTimeout(f"{self.name}: render exceeded {limit:.1f} s (at denoising step {step + 1})")
            return callback_kwargs

        params = inspect.signature(pipe.__call__).parameters if hasattr(pipe, "__call__") else {}
        if limit is not None and "callback_on_step_end" in params:
            kwargs["callback_on_step_end"] = on_step
        kwargs.update(self.extra)
        out = pipe(**kwargs)
        if limit is not None and time.monotonic() - start > limit:
            raise GeneratorTimeout(f"{self.name}: render exceeded {limit:.1f} s")
        images = getattr(out, "images", None)
        if not images:
            raise GeneratorError(f"{self.name}: the pipeline returned no image")
        image = images[0]
        if not hasattr(image, "convert"):
            from PIL import Image

            image = Image.fromarray(image)
        return image.convert("RGB")

    def _size_kwargs(self) -> dict[str, int]:
        out = {}
        if self.width:
            out["width"] = int(self.width)
        if self.height:
            out["height"] = int(self.height)
        return out

    def _target_size(self, pipe) -> tuple[int, int]:
        """Output (width, height): as configured, else the pipeline's default."""
        if self.width and self.height:
            return int(self.width), int(self.height)
        side = None
        unet = getattr(pipe, "unet", None)
        scale = getattr(pipe, "vae_scale_factor", 8)
        if unet is not None and getattr(unet.config, "sample_size", None):
            side = int(unet.config.sample_size) * int(scale)
        side = side or 1024
        return int(self.width or side), int(self.height or side)
