"""What a run leaves for people: tables of stored points, the report, plots, the W&B mirror,
mergekit recipes."""
