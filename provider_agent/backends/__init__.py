"""Backend adapters: one module per kind, all on the OpenAI-compatible base in `base.py`."""
