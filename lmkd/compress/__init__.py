"""lmkd.compress.run: layer dropping, head pruning and exports for serving (lmkd compress)."""
