"""The policy interfaces: sampling settings, completions, and the one call every rollout makes.

Every policy that drives trajectories is a :class:`RolloutPolicy`: ``run_conversations`` takes any
number of multi-turn conversations, asks ``next_messages(i)`` for conversation i's messages before
each of its turns and hands each written turn to ``on_turn(i, completion)``. A local model
(:class:`~genevolve.policies.local.LocalPolicy`) batches them continuously; a policy that writes one
turn of one conversation per call (``complete(messages, seed) -> str``: the scripted expert, a remote
chat server through :class:`AsAgentPolicy`) subclasses :class:`TurnByTurnPolicy`, which asks the
conversations round by round (:func:`run_in_rounds`).

Every completion carries the sampled text and, where the policy can tell, the sampled token ids
and their log-probabilities under the policy (natural log, temperature 1, i.e. the model's own
distribution; what GRPO's ratio and VED's teacher comparison need). Sampling settings are explicit
in :class:`SamplingParams`; nothing is hidden in a policy's defaults.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

Message = dict[str, Any]
NextMessages = Callable[[int], Sequence[Message] | None]


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
    """One assistant turn.

    ``finish_reason`` is "stop" (end of turn), "length" (token budget), "error" (no turn; ``error``
    says why) or None (a policy that returns only text does not say how its turn ended).
    """

    text: str
    finish_reason: str | None = "stop"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # one per token id, when the backend provides them
    error: str | None = None


OnTurn = Callable[[int, Completion], None]


@dataclass
class TokenStream:
    """Everything one conversation has been through, token by token (empty for policies without tokens)."""

    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # the rendered text the ids stand for (for prefix checks)
    text_without_stop: str = ""  # the same without the last turn's stop token
    resets: int = 0  # times the stream had to be re-encoded from scratch


class ModelCallError(RuntimeError):
    """The model failed in the middle of a batch (e.g. out of memory); ``streams`` holds what was written."""

    def __init__(self, message: str, streams):
        super().__init__(message)
        self.streams = streams


class ChatPolicy(Protocol):
    name: str

    def generate(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]: ...


class RolloutPolicy(Protocol):
    """What :func:`~genevolve.agent.rollout.rollout` drives.

    ``run_conversations`` runs ``n`` conversations to their end and returns one :class:`TokenStream`
    each. ``next_messages(i)`` gives conversation i's messages before its next turn (None: finished);
    ``on_turn(i, completion)`` receives each turn as soon as it is written. Conversation i samples
    with ``seeds[i]`` (default: ``params.seed`` for all; random when that is None). ``max_batch`` caps
    how many conversations share a batch. ``on_progress()``, when given, is called whenever
    conversations may have finished. A model failure that ends every conversation raises
    :class:`ModelCallError`. ``needs_exclusive_device``: the policy holds a model whose runs must not
    overlap (callers that share it take turns).
    """

    name: str
    needs_exclusive_device: bool

    def run_conversations(self, n: int, next_messages: NextMessages, on_turn: OnTurn, params: SamplingParams,
                          max_batch: int = 64, seeds: Sequence[int | None] | None = None,
                          on_progress: Callable[[], None] | None = None) -> list[TokenStream]: ...


def conversation_seeds(n: int, params: SamplingParams, seeds: Sequence[int | None] | None = None) -> list[int]:
    """The seed of each of ``n`` conversations: ``seeds`` (default ``params.seed``), a random one for None."""
    if seeds is None:
        seeds = [params.seed] * n
    elif len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} conversations")
    return [int(s) if s is not None else random.SystemRandom().getrandbits(63) for s in seeds]


def run_in_rounds(write: Callable[[Sequence[Message], int], str], n: int, next_messages: NextMessages,
                  on_turn: OnTurn, seeds: Sequence[int], on_progress: Callable[[], None] | None = None) -> list[TokenStream]:
    """Drive ``n`` conversations round by round with ``write(messages, seed) -> text``.

    Each round asks every unfinished conversation for one turn, in index order, with its own seed.
    A turn's finish reason is unknown (None). An exception from ``write`` becomes an "error"
    completion whose ``error`` is ``"<exception type>: <message>"``. ``on_progress()`` runs after
    each round. Nothing is tokenised: the streams come back empty.
    """
    while True:
        active = [(i, msgs) for i in range(n) if (msgs := next_messages(i)) is not None]
        if not active:
            break
        for i, msgs in active:
            try:
                text = write(msgs, seeds[i])
            except Exception as exc:  # a failing policy ends this conversation, not the run
                on_turn(i, Completion(text="", finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                continue
            on_turn(i, Completion(text=text, finish_reason=None))
        if on_progress:
            on_progress()
    return [TokenStream() for _ in range(n)]


class TurnByTurnPolicy(ABC):
    """A :class:`RolloutPolicy` from ``complete(messages, seed) -> str``: one turn of one conversation per call.

    Subclasses set ``name`` and implement :meth:`complete`; :meth:`run_conversations` asks the
    conversations round by round (:func:`run_in_rounds`) and ignores ``max_batch``.
    """

    needs_exclusive_device = False

    @abstractmethod
    def complete(self, messages: list[Message], seed: int = 0) -> str:
        """The next assistant turn of one conversation."""

    def run_conversations(self, n: int, next_messages: NextMessages, on_turn: OnTurn, params: SamplingParams,
                          max_batch: int = 64, seeds: Sequence[int | None] | None = None,
                          on_progress: Callable[[], None] | None = None) -> list[TokenStream]:
        return run_in_rounds(lambda msgs, seed: self.complete(msgs, seed=seed), n, next_messages, on_turn,
                             conversation_seeds(n, params, seeds), on_progress)


class AsAgentPolicy(TurnByTurnPolicy):
    """Adapts a :class:`ChatPolicy` (e.g. a remote chat server) to :class:`RolloutPolicy` and ``complete(messages, seed)``.

    A failed completion raises from :meth:`complete`, so the conversation ends with an ``error``
    termination. :meth:`complete` samples with ``params`` (and the given seed); :meth:`run_conversations`
    with its own ``params`` and each conversation's seed. :meth:`generate` is the wrapped policy's.
    """

    def __init__(self, policy: ChatPolicy, params: SamplingParams = SamplingParams()):
        self.policy = policy
        self.params = params
        self.name = policy.name

    def generate(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]:
        return self.policy.generate(conversations, params)

    def _text(self, messages: list[Message], params: SamplingParams) -> str:
        out = self.policy.generate([messages], params)[0]
        if out.finish_reason == "error":
            raise RuntimeError(out.error or "policy failed")
        return out.text

    def complete(self, messages: list[Message], seed: int = 0) -> str:
        return self._text(messages, replace(self.params, seed=seed))

    def run_conversations(self, n: int, next_messages: NextMessages, on_turn: OnTurn, params: SamplingParams,
                          max_batch: int = 64, seeds: Sequence[int | None] | None = None,
                          on_progress: Callable[[], None] | None = None) -> list[TokenStream]:
        return run_in_rounds(lambda msgs, seed: self._text(msgs, replace(params, seed=seed)), n, next_messages,
                             on_turn, conversation_seeds(n, params, seeds), on_progress)
