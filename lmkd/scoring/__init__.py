"""lmkd.scoring: metrics and significance, via the real libraries."""
