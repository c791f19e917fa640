"""Rollouts on a vLLM / SGLang server that follows the trainer's LoRA adapter.

The student's rollouts can run on an inference server while the trainer holds the weights: after
every update the trainer saves its adapter, and :class:`RemoteStudent` hot-loads it on the server
under a new name (``<prefix>-step<N>``) and sends every later request to that name; older adapters
are unloaded (``keep`` most recent stay). The server must see the adapter folder at the same path
(a shared file system), as vLLM and SGLang read it themselves.

Server side:

- vLLM: ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve <base> --enable-lora --max-lora-rank 64``
  (``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``);
- SGLang: ``python -m sglang.launch_server --model-path <base> --enable-lora --max-lora-rank 64``
  (``POST /load_lora_adapter``, ``/unload_lora_adapter``);
- ours: ``genevolve serve`` speaks vLLM's endpoints.

With the self-evolution trainer: ``evolve(cfg, on_step=student.follow(cfg.out))`` hot-loads
``<out>/checkpoint/adapter`` after each step. See ``docs/scale-out.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import httpx

from ..policies.base import AsAgentPolicy, SamplingParams, TurnByTurnPolicy

PATHS = {"vllm": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
         "genevolve": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
         "sglang": ("/load_lora_adapter", "/unload_lora_adapter")}


def _root(base_url: str) -> str:
    base = base_url.strip().rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


class AdapterHotLoader:
    """Load and unload LoRA adapters on a running server (vLLM, SGLang or ``genevolve serve``)."""

    def __init__(self, base_url: str, server: str = "vllm", api_key: str | None = None, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None):
        if server not in PATHS:
            raise ValueError(f"server is one of {', '.join(PATHS)}, not {server!r}")
        self.root = _root(base_url)
        self.server = server
        key = api_key or os.environ.get("OPENAI_API_KEY")
        self._http = httpx.Client(transport=transport, timeout=timeout,
                                  headers={"Authorization": f"Bearer {key}"} if key else {})

    def _post(self, path: str, body: dict[str, Any]) -> None:
        url = self.root + path
        try:
            resp = self._http.post(url, json=body)
        except httpx.TransportError as exc:
            raise RuntimeError(f"POST {url} failed: {type(exc).__name__}: {exc}") from exc
        if not resp.is_success:
            raise RuntimeError(f"POST {url} failed: HTTP {resp.status_code}: {resp.text.strip()[:300]}")

    def load(self, name: str, path: str | os.PathLike) -> None:
        self._post(PATHS[self.server][0], {"lora_name": name, "lora_path": str(Path(path).resolve())})

    def unload(self, name: str) -> None:
        self._post(PATHS[self.server][1], {"lora_name": name})


class RemoteStudent(TurnByTurnPolicy):
    """An agent policy (``complete``, asked round by round in rollouts) and chat policy (``generate``) on a server,
    following the latest adapter."""

    def __init__(self, base_url: str, base_model: str, server: str = "vllm", prefix: str = "student", keep: int = 1,
                 params: SamplingParams = SamplingParams(), api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None, **client_kwargs: Any):
        from ..policies.openai_compat import OpenAIChatPolicy

        self.chat = OpenAIChatPolicy(base_url, base_model, api_key=api_key, transport=transport, **client_kwargs)
        self.loader = AdapterHotLoader(base_url, server, api_key=api_key, transport=transport)
        self.base_model = base_model
        self.prefix = prefix
        self.keep = max(1, int(keep))
        self.params = params
        self.loaded: list[str] = []
        self.name = f"remote:{base_model}"

    @property
    def model(self) -> str:
        return self.chat.model

    def update(self, adapter_dir: str | os.PathLike, step: int) -> str:
        """Hot-load ``adapter_dir`` as ``<prefix>-step<step>``; later requests use it. Returns the name."""
        name = f"{self.prefix}-step{step}"
        if name not in self.loaded:
            self.loader.load(name, adapter_dir)
            self.loaded.append(name)
        self.chat.model = name
        self.name = f"remote:{name}"
        while len(self.loaded) > self.keep:
            self.loader.unload(self.loaded.pop(0))
        return name

    def follow(self, run_dir: str | os.PathLike) -> Callable[[dict], None]:
        """An ``on_step`` callback for the self-evolution trainer: hot-load its checkpoint after each step."""
        adapter = Path(run_dir) / "checkpoint" / "adapter"
        return lambda row: self.update(adapter, int(row["step"]))

    def generate(self, conversations, params: SamplingParams):
        return self.chat.generate(conversations, params)

    def complete(self, messages, seed: int = 0) -> str:
        return AsAgentPolicy(self.chat, self.params).complete(messages, seed=seed)

    def close(self) -> None:
        self.chat.close()
