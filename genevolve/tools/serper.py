"""Serper-compatible web search clients (``POST /search``, ``POST /images``).

They talk to google.serper.dev for real runs or to our own gateway, which
serves the offline stores in the same format. Server trouble never raises out
of a tool call: a rollout of many episodes must survive a flaky search API, so
a failed query becomes an error block the policy can read (text) or an empty
result with ``last_error`` set (images).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx

from ..records.schema import atomic_write_bytes
from .base import EMPTY_QUERIES, ImageHit, format_text_results, join_blocks

DEFAULT_BASE_URL = "https://google.serper.dev"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
MAX_IMAGE_BYTES = 20 * 1024 * 1024
_PIL_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}
# Many image hosts refuse requests without a browser-like agent.
_DOWNLOAD_HEADERS = {"User-Agent": "Mozilla/5.0 (compatible; genevolve)", "Accept": "image/*,*/*;q=0.8"}


def _is_retryable_status(code: int) -> bool:
    return code == 429 or code >= 500


class _SerperClient:
    """Base URL, key, HTTP client and the bounded retry loop shared by both tools."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        backoff: float,
        transport: httpx.BaseTransport | None,
    ):
        self.base_url = (base_url or os.environ.get("SERPER_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("SERPER_API_KEY") or ""
        host = httpx.URL(self.base_url).host
        if not self.api_key and host not in LOOPBACK_HOSTS:
            raise RuntimeError(
                f"no Serper API key for {self.base_url}: set SERPER_API_KEY or pass api_key= "
                "(only a loopback gateway may be used without one)"
            )
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self._http = httpx.Client(transport=transport, timeout=timeout, follow_redirects=True)

    def close(self) -> None:
        self._http.close()

    def _sleep(self, attempt: int) -> None:
        if self.backoff > 0:
            time.sleep(self.backoff * 2**attempt)

    def _send(self, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response | None, str]:
        """Up to ``1 + max_retries`` attempts; retries connection errors, timeouts, 429 and 5xx."""
        reason = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(attempt - 1)
            try:
                resp = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:  # connect errors and timeouts
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if resp.is_success:
                return resp, ""
            reason = f"HTTP {resp.status_code}"
            if not _is_retryable_status(resp.status_code):
                body = resp.text.strip()[:200]
                return None, f"{reason}: {body}" if body else reason
        return None, f"{reason} after {self.max_retries + 1} attempts"

    def _post(self, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["X-API-KEY"] = self.api_key
        resp, reason = self._send("POST", f"{self.base_url}{path}", json=payload, headers=headers)
        if resp is None:
            return None, reason
        try:
            data = resp.json()
        except ValueError:
            return None, "response is not JSON"
        if not isinstance(data, dict):
            return None, f"expected a JSON object, got {type(data).__name__}"
        return data, ""


class SerperTextSearch(_SerperClient):
    """``search`` through ``POST {base}/search``; each query is one request, run in parallel."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout, max_retries, backoff, transport)

    def _one(self, query: str, top_k: int) -> str:
        data, reason = self._post("/search", {"q": query, "num": top_k})
        if data is None:
            return f"--- search error for [{query}]: {reason} ---"
        items = [o for o in data.get("organic") or [] if isinstance(o, dict)]
        return format_text_results(query, items, top_k)

    def search(self, queries: list[str], top_k: int = 5) -> str:
        if not queries:
            return EMPTY_QUERIES
        if isinstance(queries, str):
            queries = [queries]
        cleaned = [str(q).strip() for q in queries if q is not None and str(q).strip()]
        if not cleaned:
            return join_blocks([])
        with ThreadPoolExecutor(max_workers=min(8, len(cleaned))) as pool:
            blocks = list(pool.map(lambda q: self._one(q, top_k), cleaned))
        return join_blocks(blocks)


def _default_download_dir() -> Path:
    return Path(tempfile.gettempdir()) / "genevolve_images"


def _url_ext(url: str) -> str:
    if url.startswith("data:"):
        mime = url[5:].split(",", 1)[0].split(";", 1)[0].lower()
        ext = "." + mime.split("/", 1)[1] if mime.startswith("image/") else ""
    else:
        ext = Path(httpx.URL(url).path).suffix.lower()
    ext = ".jpg" if ext == ".jpeg" else ext
    return ext if ext in IMAGE_EXTS else ""


def _decode_data_uri(url: str) -> bytes:
    header, _, payload = url[5:].partition(",")
    if ";base64" in header.lower():
        return base64.b64decode(payload, validate=False)
    return unquote_to_bytes(payload)


def _image_format(data: bytes) -> str | None:
    """PIL's format name when the bytes are a readable image, else None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        return fmt or "UNKNOWN"
    except Exception:  # PIL raises many types for corrupt input
        return None


class SerperImageSearch(_SerperClient):
    """``image_search`` through ``POST {base}/images``; results are downloaded so the agent can see them."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        download_dir: str | os.PathLike | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout, max_retries, backoff, transport)
        self.download_dir = Path(download_dir or os.environ.get("IMAGE_DOWNLOAD_DIR") or _default_download_dir())
        self.last_error: str | None = None
        self.dropped: list[tuple[str, str]] = []  # (url, why) for results of the last call that were dropped

    def download(self, url: str) -> tuple[str | None, str]:
        """Fetch ``url`` into the download folder once; return (local path, "") or (None, why)."""
        key = hashlib.sha1(url.encode("utf-8")).hexdigest()
        ext = _url_ext(url)
        if ext:
            cached = self.download_dir / f"{key}{ext}"
            if cached.is_file():
                return str(cached), ""
        else:
            cached_any = [p for p in self.download_dir.glob(f"{key}.*") if p.suffix in IMAGE_EXTS]
            if cached_any:
                return str(cached_any[0]), ""

        if url.startswith("data:"):
            try:
                data = _decode_data_uri(url)
            except (binascii.Error, ValueError) as exc:
                return None, f"bad data URI: {exc}"
        elif url.startswith(("http://", "https://")):
            resp, reason = self._send("GET", url, headers=_DOWNLOAD_HEADERS)
            if resp is None:
                return None, reason
            data = resp.content
        else:
            return None, "unsupported URL scheme"
        if len(data) > MAX_IMAGE_BYTES:
            return None, f"image larger than {MAX_IMAGE_BYTES} bytes"
        fmt = _image_format(data)
        if fmt is None:
            return None, "not a readable image"

        path = self.download_dir / f"{key}{ext or _PIL_EXT.get(fmt, '.img')}"
        atomic_write_bytes(path, data)
        return str(path), ""

    def _try_download(self, url: str) -> tuple[str | None, str]:
        # A malformed URL from the server or a failed write drops one result, not the whole call.
        try:
            return self.download(url)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def image_search(self, query: str, top_k: int = 5) -> list[ImageHit]:
        self.last_error, self.dropped = None, []
        query = str(query or "").strip()
        if not query:
            self.last_error = "empty query"
            return []
        data, reason = self._post("/images", {"q": query, "num": top_k})
        if data is None:
            self.last_error = reason
            return []

        candidates = []
        for item in (data.get("images") or [])[: max(top_k, 0)]:
            if not isinstance(item, dict):
                continue
            url = item.get("imageUrl") or item.get("image_url") or item.get("thumbnailUrl") or item.get("url")
            if url:
                candidates.append((str(url), item))
        if not candidates:
            return []

        with ThreadPoolExecutor(max_workers=min(8, len(candidates))) as pool:
            fetched = list(pool.map(lambda c: self._try_download(c[0]), candidates))
        hits = []
        for (url, item), (path, why) in zip(candidates, fetched):
            if path is None:
                self.dropped.append((url, why))
                continue
            hits.append(
                ImageHit(
                    title=str(item.get("title") or "image"),
                    url=url,
                    local_path=path,
                    page_url=str(item.get("link") or item.get("source") or ""),
                )
            )
        return hits
