"""Servers other tools call: an OpenAI-compatible chat server, the render service, a Serper-format search gateway, and LoRA hot-loading on inference servers."""
