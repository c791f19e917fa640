"""A diffusers text-to-image generator: SD-Turbo, SDXL-Turbo, FLUX-schnell class pipelines.

    gen = DiffusersTextToImage("stabilityai/sdxl-turbo")            # a hub id in the local cache
    gen = DiffusersTextToImage("/models/flux-schnell", steps=4)      # or a folder from save_pretrained
    image = gen.generate("a red kite above exactly three boats", seed=0)

Text-to-image cannot look at pictures: a program's references are not used (``last_notes`` says
so); choose :class:`~genevolve.generators.diffusers_ref.DiffusersReferenceGenerator` for that.
Defaults suit distilled (turbo / schnell) models: 4 steps, no classifier-free guidance.
"""

from __future__ import annotations

from typing import Any, Sequence

from ._diffusers import DiffusersBackend, dtype_kwargs


class DiffusersTextToImage(DiffusersBackend):
    kind = "t2i"

    def _load(self, model: str, torch_dtype):
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(model, **dtype_kwargs(torch_dtype))

    def generate(self, prompt: str, references: Sequence[Any] = (), seed: int = 0):
        pipe = self.pipe
        self.last_notes = [f"{len(references)} reference image(s) not used: text-to-image"] if references else []
        return self._call(pipe, prompt=prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                          generator=self._torch_generator(seed), **self._size_kwargs())
