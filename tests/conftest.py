import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The user's data folder (index caches, editable reference copies) is a temporary one during tests.
os.environ["GENEVOLVE_DATA"] = tempfile.mkdtemp(prefix="genevolve-test-data-")

from pathlib import Path

import pytest

from _checkout_guard import guard
from studio_browser import page, studio  # noqa: F401  (the browser tests' shared studio, one per session)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def checkout_unchanged(tmp_path_factory):
    """An error at the end of the session naming every file the tests created, changed or deleted in the checkout
    (see _checkout_guard.py). Not under mutmut, which rewrites its own copy of the checkout while tests run."""
    if "MUTANT_UNDER_TEST" in os.environ:
        yield
        return
    yield from guard(ROOT, ignore=[tmp_path_factory.getbasetemp()])


@pytest.fixture(scope="session")
def world():
    from genevolve.world import World

    return World()


@pytest.fixture(scope="session")
def tools(world):
    from genevolve.agent.loop import Tools

    return Tools.for_world(world)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, world):
    """A tiny random Llama with a sandbox tokenizer, saved as a model folder (a stand-in student; read only)."""
    from genevolve.policies.tiny import build_tiny_model, train_tokenizer
    from genevolve.agent.protocol import SYSTEM_PROMPT

    tok = train_tokenizer([SYSTEM_PROMPT] + [r.text for r in world.split("evolve")] * 3, vocab_size=500)
    path = tmp_path_factory.mktemp("tiny-student")
    build_tiny_model(tok, seed=0, layers=1, hidden=64).save_pretrained(path)
    tok.save_pretrained(path)
    return path
