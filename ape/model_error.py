"""The one error every model loader raises: its own module, so loaders can import it both ways."""


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says how to get it."""
