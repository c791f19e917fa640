"""The policy protocol: a batch of conversations in, the next assistant turn for each out.

Every policy returns, per conversation, the sampled text and, where it can, the sampled token ids
and their log-probabilities under the policy (natural log, temperature 1, i.e. the model's own
distribution; what GRPO's ratio and VED's teacher comparison need). Sampling settings are explicit
in :class:`SamplingParams`; nothing is hidden in a policy's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

Message = dict[str, Any]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256  # per assistant turn
    seed: int | None = None  # None: nondeterministic

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


@dataclass
class Completion:
    """One assistant turn. ``finish_reason`` is "stop" (end of turn), "length" (token budget) or "error"."""

    text: str
    finish_reason: str = "stop"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # one per token id, when the backend provides them
    error: str | None = None


class ChatPolicy(Protocol):
    name: str

    def generate(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]: ...


class AsAgentPolicy:
    """Adapts a :class:`ChatPolicy` to the agent loop's one-conversation ``complete(messages, seed)``.

    A failed completion raises, so the loop records the trajectory as an ``error`` termination.
    """

    def __init__(self, policy: ChatPolicy, params: SamplingParams = SamplingParams()):
        self.policy = policy
        self.params = params
        self.name = policy.name

    def complete(self, messages: list[Message], seed: int = 0) -> str:
        from dataclasses import replace

        out = self.policy.generate([messages], replace(self.params, seed=seed))[0]
        if out.finish_reason == "error":
            raise RuntimeError(out.error or "policy failed")
        return out.text
