"""lmkd.evaluate.run: evaluate_models, fidelity and the one report writer."""
