"""Policies: the scripted expert lives in genevolve.world.expert; learned ones live here.

- :mod:`.base`: the protocol (``generate(conversations, params) -> completions`` with log-probs);
- :mod:`.local`: any local transformers model (GGUF too), LoRA adapters, token streams;
- :mod:`.openai_compat`: any OpenAI-compatible chat-completions server;
- :mod:`.tiny`: the tiny sandbox policy's tokenizer and model;
- :mod:`.resolve`: ``--policy`` values to policy objects.
"""

from .base import AsAgentPolicy, ChatPolicy, Completion, Message, SamplingParams

__all__ = ["AsAgentPolicy", "ChatPolicy", "Completion", "Message", "SamplingParams"]
