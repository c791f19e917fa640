"""Records: every persisted record (typed, versioned), run folders, what a training run writes for live viewers, and where user data goes."""
