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
    from genevolve.agent import Tools

    return Tools.for_world(world)
