"""Tool backends: text search, image search and skill knowledge, local or over HTTP.

Importing this package is cheap: FAISS and the sentence embedder load on first use.
"""

from .base import (
    ImageHit,
    ImageSearch,
    Knowledge,
    TextSearch,
    format_image_results,
    format_text_results,
)
from .faiss_store import VectorIndex
from .knowledge import SkillCards
from .local import LocalImageSearch, LocalTextSearch, build_indexes
from .serper import SerperImageSearch, SerperTextSearch

__all__ = [
    "ImageHit",
    "ImageSearch",
    "Knowledge",
    "LocalImageSearch",
    "LocalTextSearch",
    "SerperImageSearch",
    "SerperTextSearch",
    "SkillCards",
    "TextSearch",
    "VectorIndex",
    "build_indexes",
    "format_image_results",
    "format_text_results",
]
