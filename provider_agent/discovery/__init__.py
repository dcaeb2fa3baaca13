"""What the backends serve: one pass over their adapters, the catalog, when passes run."""
