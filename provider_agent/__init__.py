"""provider-agent: sells a GPU host's inference on the marketplace."""

__version__ = "0.1.0"
