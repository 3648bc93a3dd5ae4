"""Errors a user can cause. Owns the `GemmaScopeError` hierarchy; every message names the bad
value and what was expected, so the CLI can print it instead of a traceback."""


class GemmaScopeError(Exception):
    """Base class for every error caused by user input (bad names, files, values)."""


class ConfigError(GemmaScopeError, ValueError):
    """A value given by the user is out of range or of the wrong kind."""


class ModelError(GemmaScopeError):
    """A model cannot be found or loaded, or a site does not exist on it."""


class SiteError(ConfigError, ModelError):
    """An SAE's site is missing from its config, absent from the model, or of another width there
    (both a bad value and a model mismatch, so either class catches it)."""


class CorpusError(GemmaScopeError):
    """A text source is empty, unreadable or too small."""


class StoreError(GemmaScopeError):
    """An activation store or run folder is missing, corrupt or belongs to something else."""


class FormatError(GemmaScopeError):
    """An SAE file has missing or misshaped keys or non-finite values."""


class TrainingError(GemmaScopeError):
    """Training broke down (a spike or collapse it could not recover from); nothing was saved."""
