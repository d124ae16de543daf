"""Model implementations over the attention interface, and the checkpoint loader."""
