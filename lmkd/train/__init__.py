"""lmkd.train: DistillationConfig, DistillationTrainer, the objective, regimes, run_distill."""
