"""lmkd.evaluate.run: evaluate_models (its runners, its summary), fidelity and the one report writer."""
