"""A client of the render-service protocol, so a generator can live on another machine.

    POST <url>/generate  {"prompt": "...", "image_urls": ["data:image/png;base64,...", ...], "seed": 0}
    -> 200 {"success": true, "image": "<base64 PNG or JPEG>"}

Several URLs are used round-robin (one attempt per URL in turn), so a pool of GPU servers shares
the load and a dead one is skipped. Connection errors, time-outs, 429, 5xx, malformed JSON and
``success: false`` are retried on the next URL, at most ``1 + max_retries`` attempts in all; other
4xx fail at once (the request itself is wrong). A render that still fails raises
:class:`~genevolve.generators.GeneratorError` naming every URL tried and why; scorers record that
on the one case. References are sent scaled down to at most 4 megapixels each (a render service takes
16 in one request), and a returned picture over 16 megapixels is refused before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import threading
import time
from typing import Any, Sequence

import httpx

from . import GeneratorError, GeneratorTimeout


REF_PIXELS = 4_000_000  # a reference is sent at most this big: four fit a render service's 16 megapixels a request
MAX_ANSWER_PIXELS = 16_000_000  # a returned picture larger than this is refused before it is decoded


def image_to_data_uri(image: Any, max_pixels: int | None = None) -> str:
    """A PIL image (or numpy array) as a ``data:image/png;base64,...`` URI, scaled down (aspect kept) to at
    most ``max_pixels`` when given."""
    if not hasattr(image, "save"):
        from PIL import Image

        image = Image.fromarray(image)
    image = image.convert("RGB")
    if max_pixels and image.width * image.height > max_pixels:
        s = (max_pixels / (image.width * image.height)) ** 0.5
        image = image.resize((max(1, int(image.width * s)), max(1, int(image.height * s))))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(b64: str, max_pixels: int = MAX_ANSWER_PIXELS):
    """Base64 (or a data URI) to a PIL RGB image; ValueError when it is not a readable image or its header
    says it has more than ``max_pixels`` (checked before decoding)."""
    from PIL import Image

    if b64.startswith("data:"):
        header, _, b64 = b64.partition(",")
        if ";base64" not in header:
            raise ValueError("data URI is not base64-encoded")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from exc
    try:
        with Image.open(io.BytesIO(raw)) as im:
            size = im.size
            if size[0] * size[1] <= max_pixels:
                return im.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt bytes
        raise ValueError(f"not a readable image ({type(exc).__name__})") from exc
    raise ValueError(f"a {size[0]}x{size[1]} picture, over {max_pixels / 1e6:g} megapixels")


def _endpoint(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if httpx.URL(url).path.endswith("/generate") else url + "/generate"


class RenderServiceGenerator:
    """``generate(prompt, references, seed)`` through one or more render services."""

    def __init__(self, urls: Sequence[str] | str, timeout: float = 600.0, max_retries: int = 3, backoff: float = 1.0,
                 max_refs: int = 4, transport: httpx.BaseTransport | None = None, name: str | None = None,
                 extra: dict[str, Any] | None = None):
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("the render service client needs at least one URL")
        self.urls = [_endpoint(u) for u in urls]
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.max_refs = int(max_refs)
        self.extra = dict(extra or {})
        self.name = name or f"render-service:{','.join(self.urls)}"
        self._cycle = itertools.cycle(range(len(self.urls)))
        self._lock = threading.Lock()
        self._http = httpx.Client(transport=transport, timeout=self.timeout)

    def close(self) -> None:
        self._http.close()

    def _next_url(self) -> str:
        with self._lock:
            return self.urls[next(self._cycle)]

    def generate(self, prompt: str, references: Sequence[Any] = (), seed: int = 0):
        refs = [image_to_data_uri(r, REF_PIXELS) for r in list(references)[: self.max_refs]]
        payload = {"prompt": prompt, "image_urls": refs,
                   "seed": int(seed), **self.extra}
        failures: list[str] = []
        timeouts = 0
        for attempt in range(self.max_retries + 1):
            if attempt and self.backoff > 0:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            url = self._next_url()
            try:
                resp = self._http.post(url, json=payload)
            except httpx.TimeoutException:
                timeouts += 1
                failures.append(f"{url}: timed out after {self.timeout:g} s")
                continue
            except httpx.TransportError as exc:
                failures.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                failures.append(f"{url}: HTTP {resp.status_code}: {resp.text.strip()[:200]}")
                continue
            if not resp.is_success:
                raise GeneratorError(f"{url} refused the request: HTTP {resp.status_code}: {resp.text.strip()[:300]}")
            try:
                data = resp.json()
            except ValueError:
                failures.append(f"{url}: response is not JSON: {resp.text.strip()[:120]!r}")
                continue
            if not isinstance(data, dict) or data.get("success") is not True:
                err = data.get("error") if isinstance(data, dict) else None
                failures.append(f"{url}: success is not true ({err or str(data)[:120]})")
                continue
            b64 = data.get("image") or data.get("image_base64")
            if not isinstance(b64, str) or not b64:
                failures.append(f"{url}: no 'image' in the response")
                continue
            try:
                return decode_image(b64)
            except ValueError as exc:
                failures.append(f"{url}: 'image' is {exc}")
        msg = f"render service failed after {self.max_retries + 1} attempt(s): " + "; ".join(failures)
        raise (GeneratorTimeout if timeouts == len(failures) else GeneratorError)(msg)
