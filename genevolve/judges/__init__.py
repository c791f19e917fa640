"""Model judges over an OpenAI-compatible multimodal chat API.

- :mod:`.chat`: what every API judge shares: the client (retries, time-outs), the missing-key
  check, a rate limiter, a content-hash cache, answer parsing;
- :mod:`.vlm`: the KScore judge (F, V, T, A) and the program-sufficiency judge (R_text);
- :mod:`genevolve.evaluation.wise`: the WISE judge (consistency, realism, aesthetic quality -> WiScore).

A judge either returns scores inside its rubric or raises :class:`JudgeError`; scorers record the
error on that case (``Verdict.failed``), never a made-up score.
"""

from .chat import JudgeError

__all__ = ["JudgeError"]
