"""The offline demo: the whole pipeline on a tiny synthetic base, and that base's recipe."""
