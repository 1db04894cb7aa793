"""What a run leaves for people: the report (tables), plots, the W&B mirror, mergekit recipes."""
