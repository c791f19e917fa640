"""Trainers: SFT (cold start) now; GRPO and VED build on the same pieces."""
