"""The error of a store that cannot be used as asked."""


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message says why and what to do."""
