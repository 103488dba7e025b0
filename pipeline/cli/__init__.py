"""``morag-pipeline``: the command line."""
