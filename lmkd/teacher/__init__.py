"""lmkd.teacher: the teacher signal: frozen/ensemble teachers, logit cache, pseudo-targets,
cross-tokenizer alignment."""
