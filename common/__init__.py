"""lorafleet.common: what producers and workers agree on (never imports torch)."""

__version__ = "0.1.0"
