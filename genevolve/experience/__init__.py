"""Visual experiences: best-vs-worst pair mining, the experience bank (JSONL + FAISS) and the summarisers."""
