"""Policies: the scripted expert lives in genevolve.agent.expert; learned ones live here.

- :mod:`.base`: the interfaces (``run_conversations`` for rollouts, ``generate(conversations, params)``
  for single turns with log-probs) and :class:`TurnByTurnPolicy` for policies that write one turn per call;
- :mod:`.sampling`: per-trajectory sampling noise and token sampling;
- :mod:`.local`: any local transformers model (GGUF too), LoRA adapters, token streams;
- :mod:`.continuous`: the continuous-batching engine behind a local policy's ``run_conversations``;
- :mod:`.openai_compat`: any OpenAI-compatible chat-completions server;
- :mod:`.tiny`: the tiny sandbox policy's tokenizer and model;
- :mod:`.resolve`: ``--policy`` values to policy objects.
"""

from .base import (AsAgentPolicy, ChatPolicy, Completion, Message, ModelCallError, RolloutPolicy, SamplingParams,
                   TokenStream, TurnByTurnPolicy, run_in_rounds)

__all__ = ["AsAgentPolicy", "ChatPolicy", "Completion", "Message", "ModelCallError", "RolloutPolicy", "SamplingParams",
           "TokenStream", "TurnByTurnPolicy", "run_in_rounds"]
