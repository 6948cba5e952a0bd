"""Progress relay: workers report batch progress through Redis, browsers get it live."""

__version__ = "0.1.0"
