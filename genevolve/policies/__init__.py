"""Policies: the scripted expert lives in genevolve.world.expert; learned ones live here."""

from .base import AsAgentPolicy, ChatPolicy, Completion, Message, SamplingParams

__all__ = ["AsAgentPolicy", "ChatPolicy", "Completion", "Message", "SamplingParams"]
