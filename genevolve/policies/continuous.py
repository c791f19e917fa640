"""Continuous batching for multi-turn rollouts with a local transformers model.

Lock-step rounds (every conversation writes one turn, then all tools run, then the next round)
leave most of the batch idle: a round lasts as long as its longest turn. Here each conversation
holds one row of a batch for its whole life. A row that finishes its turn leaves decoding at once;
its tool runs, its new tokens (the observation and the next prompt) are prefilled, and it rejoins
while the others keep decoding.

Each row keeps its own tokens in columns ``[0, length)`` of a key/value buffer, so its cache is
never cut out and re-assembled between turns. A forward call writes each row's new tokens right
after its own length; the 4D attention mask built here lets row r's query j see exactly the
columns ``< length[r] + j + 1``. Waiting rows are prefilled together, once enough of them wait
(``join_fraction`` of the decoding rows) or none decode, in as few calls as ``PREFILL_SCORES``
allows.

Sampling never depends on the batch: each token is drawn by inverting its row's distribution at a
uniform number keyed by (the conversation's seed, its first user message, the token's position in
its stream) (:mod:`genevolve.policies.sampling`). A trajectory is then the same alone, in
a batch of many, or next to rows that carry guides, up to floating-point differences between batch
shapes that can flip a near-tie (``benchmarks/batch_invariance.py`` measures how often).

A batch may also take conversations that arrive while it runs (``admit``, a server's new requests):
between two steps it asks for them, gives them the next indices and idle rows (adding rows up to
``max_batch`` when none is idle), and they are prefilled and decode with the others from the next
step on. Without arrivals a batch computes exactly what it would without ``admit``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .base import (Completion, Message, ModelCallError, NextMessages, OnTurn, SamplingParams, TokenStream,
                   conversation_seeds)
from .lean import lean_decoder
from .sampling import sample_tokens, stream_key, uniform

__all__ = ["ContinuousBatch", "ModelCallError", "PREFILL_SCORES"]

PREFILL_SCORES = 2**26  # attention scores one prefill call may hold (heads x rows x new tokens x width)
MIN_SHARED_PREFIX = 16  # a system block shorter than this is prefilled with its row


class _RowLayer(CacheLayerMixin):
    """One layer's keys/values, (rows, heads, capacity, dim); each row writes after its own length."""

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, owner: "_Writes"):  # noqa: the mixin's init sets keys
        self.kbuf, self.vbuf, self.owner = kbuf, vbuf, owner
        self.dtype, self.device = kbuf.dtype, kbuf.device

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # allocated up front

    @property
    def keys(self) -> torch.Tensor:
        return self.kbuf[:, :, : self.owner.width]

    @property
    def values(self) -> torch.Tensor:
        return self.vbuf[:, :, : self.owner.width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cols = self.owner.write_cols  # (rows, n)
        rows = torch.arange(cols.shape[0], device=cols.device)[:, None]
        self.kbuf[rows, :, cols] = key_states.transpose(1, 2)
        self.vbuf[rows, :, cols] = value_states.transpose(1, 2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_max_length(self) -> int:
        return -1


class _Writes:
    """Where the coming forward call writes: columns (rows, n), and the width the layers expose.

    The layers point here rather than at their cache: a cycle would keep the buffers of every past
    call alive until the garbage collector happened to run.
    """

    width = 0
    write_cols = torch.zeros(0, 0, dtype=torch.long)


class _RowCache(Cache):
    """A transformers cache whose rows have their own lengths (see the module docstring)."""

    def __init__(self, kbufs: list[torch.Tensor], vbufs: list[torch.Tensor], lengths: torch.Tensor):
        self.writes = _Writes()
        self.kbufs, self.vbufs = kbufs, vbufs
        super().__init__(layers=[_RowLayer(k, v, self.writes) for k, v in zip(kbufs, vbufs)])
        self.lengths = lengths  # (rows,) tokens each row holds

    @property
    def write_cols(self) -> torch.Tensor:
        return self.writes.write_cols

    def prepare(self, n: int) -> torch.Tensor:
        """Before a forward with ``n`` tokens per row: where they go, and the 4D mask (rows, 1, n, width)."""
        dev, w = self.lengths.device, self.writes
        w.write_cols = self.lengths[:, None] + torch.arange(n, device=dev)[None]
        w.width = int(w.write_cols.max()) + 1
        cols = torch.arange(w.width, device=dev)
        return (cols[None, None, :] <= w.write_cols[:, :, None])[:, None]


def _kv_shape(config) -> tuple[int, int, int, int]:
    """(layers, attention heads, key/value heads, head dim) of a decoder config."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, kv, dim


def _cache_keyword(model) -> str:
    """The forward keyword that takes the cache: ``cache`` (transformers 5.x), ``past_key_values`` before it."""
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT model passes keywords on to its base model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


class ContinuousBatch:
    """Drive many conversations through one model with continuous batching.

    ``next_messages(i)`` gives conversation i's messages before its next turn (``None`` when it is
    finished); ``on_turn(i, completion)`` receives each turn as soon as it is written (the caller
    runs the tool there); ``on_progress()`` is called as each conversation finishes.
    ``on_token(i, token, logprob, logits)``, when given, sees each sampled token of conversation i with
    its row's logits; returning True ends the turn there (a server's stop strings, cancellations).
    ``admit(free)``, when given, is called between steps: it returns the seeds of the conversations
    that join now (at most ``free``), which take the next indices; the callbacks are then called
    with those indices too.
    ``policy`` is a :class:`~genevolve.policies.local.LocalPolicy`; its token
    streams keep, per conversation, the exact tokens seen and written, the assistant mask and the
    sampled log-probabilities.

    Rows are kept sorted by state: decoding rows first, then rows waiting for a prefill, then idle
    rows. Each forward call then runs on a contiguous slice of the buffers (a view, no copy), and a
    row that changes state is swapped with the row at its region's edge (a copy of two rows).
    """

    def __init__(self, policy, n: int, next_messages: NextMessages, on_turn: OnTurn, params: SamplingParams,
                 max_batch: int = 64, join_fraction: float = 0.25, seeds: Sequence[int | None] | None = None,
                 on_progress: Callable[[], None] | None = None,
                 on_token: Callable[[int, int, float, torch.Tensor], bool] | None = None,
                 admit: Callable[[int], Sequence[int | None]] | None = None):
        self.p, self.params, self.on_token, self.admit = policy, params, on_token, admit
        self.next_messages, self.on_turn, self.on_progress = next_messages, on_turn, on_progress
        self.streams = [TokenStream() for _ in range(n)]
        self.queue = list(range(n))[::-1]  # conversations not yet given a row (popped from the end)
        self.rows, self.max_batch = min(n, max_batch), max_batch
        self.join_fraction = join_fraction
        self.slot: list[int | None] = [None] * self.rows  # conversation each row holds
        self.turn: list[list[tuple[int, float]]] = [[] for _ in range(self.rows)]  # (token, logprob) this turn
        self.lengths = [0] * self.rows  # tokens each row holds in the buffers
        self.n_decode = self.n_wait = 0  # rows [0, n_decode) decode, the next n_wait wait, the rest are idle
        self.dev = policy.device
        self.seeds = conversation_seeds(n, params, seeds)
        self.keys: list[int | None] = [None] * n  # each conversation's noise key, set from its first messages
        self.blocks: list[tuple[int, ...] | None] = [None] * n  # each conversation's rendered system block
        self.prefix_kv: dict[tuple[int, ...], list[torch.Tensor]] = {}  # a shared system block's keys and values
        self._rendered: dict[str, tuple[int, ...] | None] = {}  # system text -> its block, rendered once per batch
        n_layers, self.heads, kv, dim = _kv_shape(policy.model.config)
        self.cache_keyword = _cache_keyword(policy.model)
        self.lean = lean_decoder(policy.model)
        self.capacity = 0
        self.bufs = [torch.zeros(self.rows, kv, 0, dim, device=self.dev, dtype=policy.model.dtype)
                     for _ in range(2 * n_layers)]  # keys and values of each layer

    # -- rows --------------------------------------------------------------------
    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        n = max(self.lengths[a], self.lengths[b])
        if n:
            for buf in self.bufs:
                tmp = buf[a, :, :n].clone()
                buf[a, :, :n] = buf[b, :, :n]
                buf[b, :, :n] = tmp
        for meta in (self.slot, self.turn, self.lengths):
            meta[a], meta[b] = meta[b], meta[a]

    def _assign(self, r: int) -> None:
        """Row r (the first idle row) takes the next queued conversation that still needs a turn."""
        while self.queue:
            i = self.queue.pop()
            msgs = self.next_messages(i)
            if msgs is not None:
                self.slot[r], self.lengths[r], self.turn[r] = i, 0, []
                self._extend(r, msgs)
                self.n_wait += 1
                return
        self.slot[r], self.lengths[r] = None, 0

    def _admit(self) -> None:
        """Conversations that arrive now take the next indices and idle rows, or new rows up to ``max_batch``."""
        free = self.max_batch - self.n_decode - self.n_wait - len(self.queue)
        seeds = list(self.admit(free)) if free > 0 else []
        if not seeds:
            return
        n, k = len(self.streams), len(seeds)
        self.streams += [TokenStream() for _ in range(k)]
        self.seeds += conversation_seeds(k, self.params, seeds)
        self.keys += [None] * k
        self.blocks += [None] * k
        self.queue[:0] = range(n + k - 1, n - 1, -1)  # behind the conversations already queued
        self._add_rows(min(self.max_batch, self.n_decode + self.n_wait + len(self.queue)))
        while self.queue and self.n_decode + self.n_wait < self.rows:
            self._assign(self.n_decode + self.n_wait)

    def _add_rows(self, k: int) -> None:
        """Grow the batch to ``k`` rows (the new ones idle, at the end)."""
        extra = k - self.rows
        if extra <= 0:
            return
        self.bufs = [torch.cat([b, b.new_zeros(extra, *b.shape[1:])]) for b in self.bufs]
        self.slot += [None] * extra
        self.turn += [[] for _ in range(extra)]
        self.lengths += [0] * extra
        self.rows = k

    def _extend(self, r: int, msgs: Sequence[Message]) -> None:
        i = self.slot[r]
        if self.keys[i] is None:
            self.keys[i] = stream_key(self.seeds[i], msgs)
            self.blocks[i] = self._system_block(msgs) if len(self.streams) > 1 else None
        st = self.streams[i]
        resets = st.resets
        self.p.extend_stream(st, list(msgs))
        if st.resets != resets:  # re-encoded from scratch: the row's cache no longer matches
            self.lengths[r] = 0

    # -- shared system blocks ----------------------------------------------------
    def _system_block(self, msgs: Sequence[Message]) -> tuple[int, ...] | None:
        """Token ids of the conversation's system message as the template renders it alone, or None."""
        if not msgs or msgs[0].get("role") != "system":
            return None
        text = str(msgs[0].get("content"))
        if text not in self._rendered:
            self._rendered[text] = self._render_system_block(msgs[0])
        return self._rendered[text]

    def _render_system_block(self, msg: Message) -> tuple[int, ...] | None:
        try:
            text = self.p.tokenizer.apply_chat_template([dict(msg)], tokenize=False)
            ids = tuple(self.p.tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception:  # noqa: a template that cannot render a lone system message: no sharing
            return None
        return ids if len(ids) >= MIN_SHARED_PREFIX else None

    def _share_prefixes(self, lo: int, hi: int) -> None:
        """Rows [lo, hi) about to be prefilled from scratch whose stream starts with a system block that
        another row shares get that block's keys and values copied in, computed once (a batch's
        conversations all start with the same system prompt, so it is prefilled once, not per row)."""
        fresh: dict[tuple[int, ...], list[int]] = {}
        for r in range(lo, hi):
            i = self.slot[r]
            block = self.blocks[i]
            ids = self.streams[i].ids
            if self.lengths[r] == 0 and block is not None and len(ids) > len(block) and tuple(ids[: len(block)]) == block:
                fresh.setdefault(block, []).append(r)
        for block, rows in fresh.items():
            if len(rows) < 2 and block not in self.prefix_kv:
                continue
            if block not in self.prefix_kv:
                self.prefix_kv[block] = self._prefix_kv(block)
            n = len(block)
            self._ensure_capacity(n)
            for r in rows:
                for buf, kv in zip(self.bufs, self.prefix_kv[block]):
                    buf[r, :, :n] = kv
                self.lengths[r] = n

    def _prefix_kv(self, block: tuple[int, ...]) -> list[torch.Tensor]:
        """Keys and values of ``block`` at positions [0, n), each layer's (kv heads, n, dim)."""
        n, half = len(block), len(self.bufs) // 2
        bufs = [torch.zeros(1, b.shape[1], n, b.shape[3], device=self.dev, dtype=b.dtype) for b in self.bufs]
        cache = _RowCache(bufs[:half], bufs[half:], torch.zeros(1, dtype=torch.long, device=self.dev))
        self._call(torch.tensor([block], device=self.dev), cache, 1)
        return [b[0] for b in bufs]

    def _drop_idle_rows(self) -> None:
        """Free the rows no conversation will use again (idle rows are last; nothing is queued)."""
        k = self.n_decode + self.n_wait
        self.bufs = [b[:k].clone() for b in self.bufs]
        self.rows, self.slot, self.turn, self.lengths = k, self.slot[:k], self.turn[:k], self.lengths[:k]

    def _ensure_capacity(self, need: int) -> None:
        if need <= self.capacity:
            return
        cap = (need + 511) // 256 * 256  # some room, not a doubling: the buffers hold every row at the longest length
        for i, b in enumerate(self.bufs):
            nb = torch.zeros(b.shape[0], b.shape[1], cap, b.shape[3], device=b.device, dtype=b.dtype)
            nb[:, :, : b.shape[2]] = b
            self.bufs[i] = nb
        self.capacity = cap

    def _finish_turn(self, r: int) -> None:
        """Row r (decoding) ended its turn: hand it over, then move the row to waiting or idle."""
        i, st = self.slot[r], self.streams[self.slot[r]]
        ids = [t for t, _ in self.turn[r]]
        lps = [lp for _, lp in self.turn[r]]
        self.turn[r] = []
        stop = bool(ids) and ids[-1] in self.p.stop_ids
        body = ids[:-1] if stop else ids
        content = self.p.tokenizer.decode(body, skip_special_tokens=False)
        st.text_without_stop = st.text + content
        st.text += self.p.tokenizer.decode(ids, skip_special_tokens=False)
        self._swap(r, self.n_decode - 1)  # to the first waiting position
        self.n_decode -= 1
        r = self.n_decode
        self.on_turn(i, Completion(text=content, finish_reason="stop" if stop else "length", token_ids=ids, logprobs=lps))
        msgs = self.next_messages(i)
        if msgs is not None:
            self._extend(r, msgs)
            self.n_wait += 1
            return
        if self.on_progress:
            self.on_progress()
        self._swap(r, self.n_decode + self.n_wait)  # to the first idle position ...
        self._assign(self.n_decode + self.n_wait)  # ... where the next queued conversation may take it

    # -- model calls -------------------------------------------------------------
    def _forward(self, lo: int, hi: int, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Run tokens ``x`` (hi - lo, n) for rows [lo, hi); return the logits at ``keep`` (default: the last)."""
        n = x.shape[1]
        lengths = torch.tensor(self.lengths[lo:hi], device=self.dev)
        self._ensure_capacity(int(lengths.max()) + n)
        half = len(self.bufs) // 2
        cache = _RowCache([b[lo:hi] for b in self.bufs[:half]], [b[lo:hi] for b in self.bufs[half:]], lengths)
        return self._call(x, cache, keep if keep is not None else 1)[:, -1]

    def _call(self, x: torch.Tensor, cache: "_RowCache", keep: torch.Tensor | int) -> torch.Tensor:
        """The model's logits at ``keep`` for tokens ``x``, their keys and values written into ``cache``'s rows:
        through the lean forward where it applies (the same numbers, less overhead), else the model's own."""
        mask = cache.prepare(x.shape[1])
        try:
            if self.lean is not None:
                return self.lean.forward(x, cache.kbufs, cache.vbufs, cache.write_cols, mask, keep)
            out = self.p.model(input_ids=x, position_ids=cache.write_cols, attention_mask=mask, use_cache=True,
                               logits_to_keep=keep, **{self.cache_keyword: cache})
        except Exception as exc:
            raise ModelCallError(f"{type(exc).__name__}: {exc}", self.streams) from exc
        return out.logits

    def _prefill(self) -> None:
        """Prefill every waiting row's new tokens, in as few calls as the memory bound allows."""
        lo, hi = self.n_decode, self.n_decode + self.n_wait
        self._share_prefixes(lo, hi)
        news = [self.streams[self.slot[r]].ids[self.lengths[r] :] for r in range(lo, hi)]
        logits, start = [], lo
        while start < hi:  # rows [start, end) in one call, its attention scores within PREFILL_SCORES
            end, n, width = start, 0, 0
            while end < hi:
                n2, w2 = max(n, len(news[end - lo])), max(width, self.lengths[end] + len(news[end - lo]))
                if end > start and (end + 1 - start) * n2 * w2 * self.heads > PREFILL_SCORES:
                    break
                end, n, width = end + 1, n2, w2
            x = torch.zeros(end - start, n, dtype=torch.long, device=self.dev)
            for k in range(start, end):
                x[k - start, : len(news[k - lo])] = torch.tensor(news[k - lo], device=self.dev)
            keep = torch.tensor([len(news[k - lo]) - 1 for k in range(start, end)], device=self.dev)[:, None]
            logits.append(self._forward(start, end, x, keep))
            start = end
        for k, t in enumerate(news):
            self.lengths[lo + k] += len(t)
        self.n_decode, self.n_wait = hi, 0
        self._sample(lo, hi, torch.cat(logits))

    def _decode(self) -> None:
        hi = self.n_decode
        x = torch.tensor([[self.streams[self.slot[r]].ids[-1]] for r in range(hi)], device=self.dev)
        logits = self._forward(0, hi, x, None)
        for r in range(hi):
            self.lengths[r] += 1
        self._sample(0, hi, logits)

    def _sample(self, lo: int, hi: int, logits: torch.Tensor) -> None:
        """Sample one token for rows [lo, hi) (all decoding); end the turns that are over."""
        u = [uniform(self.keys[self.slot[r]], len(self.streams[self.slot[r]].ids)) for r in range(lo, hi)]
        tok, lp = sample_tokens(logits, self.params, u)
        done = []
        for r, t, l in zip(range(lo, hi), tok.tolist(), lp.tolist()):
            st = self.streams[self.slot[r]]
            ended = self.on_token is not None and self.on_token(self.slot[r], t, l, logits[r - lo])
            st.ids.append(t)
            st.mask.append(1)
            st.logprobs.append(l)
            self.turn[r].append((t, l))
            if ended or t in self.p.stop_ids or len(self.turn[r]) >= self.params.max_new_tokens:
                done.append(r)
        for r in reversed(done):  # from the end, so the swaps never move a row still to be handled
            self._finish_turn(r)

    # -- the loop ----------------------------------------------------------------
    @torch.no_grad()
    def run(self):
        """Run every conversation to its end; return the token streams."""
        for r in range(self.rows):
            self._assign(self.n_wait)
        with self.p.adapter_context():
            while self.n_decode or self.n_wait:
                if self.admit is not None:
                    self._admit()
                if not self.queue and self.n_decode + self.n_wait <= self.rows // 2:
                    self._drop_idle_rows()
                if self.n_wait and (not self.n_decode or self.n_wait >= max(1, self.join_fraction * self.n_decode)):
                    self._prefill()
                else:
                    self._decode()
        return self.streams
