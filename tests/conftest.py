import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


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
