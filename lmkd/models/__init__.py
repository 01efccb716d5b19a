"""lmkd.models: loading models, students, from-scratch models, generation, serving engines."""
