"""lmkd.data.dataset: reading rows, tokenising per task, collators, loss positions."""
