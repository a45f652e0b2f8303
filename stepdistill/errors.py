"""The error family for problems a user can fix: bad recipes, missing or corrupt files, busy run folders, runs that
diverged. The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.

A leaf module: it imports nothing from the package, so every layer can raise these without an import cycle. Each
class also derives from the builtin it replaces (ValueError, FileNotFoundError, ...), so callers that caught the
builtin keep working.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the bad value and the fix."""


class RecipeError(UserError, ValueError):
    """A recipe (or its overrides) that cannot be used as written; the message names the key and the fix."""


class InputError(UserError, ValueError):
    """A bad argument, file content or combination of settings outside the recipe."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command needs does not exist or cannot be read."""


class RunFolderError(UserError, RuntimeError):
    """A run folder that cannot be used now (held by another command, read-only, full); the message says why."""


class NonFiniteError(UserError, RuntimeError):
    """Too many steps produced a non-finite loss or gradient, or the weights themselves became non-finite."""


class OutputExistsError(UserError, FileExistsError):
    """An output path that holds something this toolkit did not write; nothing is overwritten."""


class SetupError(UserError, RuntimeError):
    """This machine or launch cannot run the command as configured (GPUs per process, a feature that fails here)."""


class MissingExtraError(UserError, ModuleNotFoundError):
    """An optional dependency (a `pip install 'stepdistill[...]'` extra) that the chosen setting needs."""
