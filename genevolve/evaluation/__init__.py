"""Evaluation: one evaluation for every caller (roll out, render, judge, aggregate, mean ± 95 % CI over seeds), model-based scoring, reports, the method's experiments, the official bench and WISE."""
