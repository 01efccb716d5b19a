"""lmkd.data: DataArguments (dataset), reading rows, tokenising per task, collators, loss positions."""
