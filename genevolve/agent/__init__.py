"""The agent: the turn protocol, the episode loop and its tools, the teacher's privileged context, decision guides, and batched rollouts."""
