"""Image generators: a program (gen_prompt + reference images) in, a PIL image out.

Every backend has ``name`` and ``generate(prompt, references, seed) -> PIL.Image`` like the
sandbox's :class:`~genevolve.world.generator.SandboxGenerator`, so scorers, the render service and
the studio take any of them:

- :mod:`.diffusers_t2i`: a diffusers text-to-image pipeline (SD-Turbo, SDXL-Turbo, FLUX class);
- :mod:`.diffusers_ref`: a reference-conditioned diffusers pipeline (image-to-image, IP-Adapter,
  Qwen-Image-Edit) that uses the program's references;
- :mod:`.render_service`: a client of the render-service protocol (``POST /generate``);
- :mod:`.tiny`: a tiny random-weight pipeline built from configs (tests, notebooks, CUDA check).

Importing this package is cheap: torch and diffusers load when a pipeline is first used.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class Generator(Protocol):
    name: str

    def generate(self, prompt: str, references: Sequence[Any] = (), seed: int = 0) -> Any: ...


class GeneratorError(RuntimeError):
    """A generator could not produce an image (bad output, service failure, time-out)."""


class GeneratorTimeout(GeneratorError):
    """A render ran past its time limit."""


def open_generator(spec: str, *, device: str | None = None, dtype: str | None = None, world=None, **kwargs: Any):
    """A generator for a ``--generator`` value.

    ``sandbox`` (the world's generator), ``tiny`` (random-weight pipeline), ``t2i:<model id or folder>``,
    ``img2img:<model>``, ``ip-adapter:<model>`` (IP-Adapter weights from ``ip_adapter=``),
    ``qwen-edit:<model>``, or ``http(s)://...`` render-service URLs (comma-separated for round-robin).
    """
    if spec == "sandbox":
        if world is None:
            from ..world import World

            world = World()
        return world.generator
    if spec.startswith(("http://", "https://")):
        from .render_service import RenderServiceGenerator

        return RenderServiceGenerator([u for u in spec.split(",") if u.strip()], **kwargs)
    kind, _, model = spec.partition(":")
    if kind == "tiny":
        from .diffusers_t2i import DiffusersTextToImage
        from .tiny import build_tiny_sd

        return DiffusersTextToImage(pipeline=build_tiny_sd(), device=device, dtype=dtype, name="tiny-sd",
                                    steps=kwargs.pop("steps", 2), **kwargs)
    if not model:
        raise ValueError(f"generator {spec!r} needs a model: {kind}:<model id or folder>")
    if kind == "t2i":
        from .diffusers_t2i import DiffusersTextToImage

        return DiffusersTextToImage(model, device=device, dtype=dtype, **kwargs)
    if kind in ("img2img", "ip-adapter", "qwen-edit"):
        from .diffusers_ref import DiffusersReferenceGenerator

        return DiffusersReferenceGenerator(model, mode=kind.replace("-", "_"), device=device, dtype=dtype, **kwargs)
    raise ValueError(f"unknown generator {spec!r}: use sandbox, tiny, t2i:<model>, img2img:<model>, "
                     "ip-adapter:<model>, qwen-edit:<model> or http(s):// render-service URLs")
