"""lmkd.core: names, files and the one user error."""
