"""The errors jaxseg raises for bad input, at the bottom of the package: every layer may raise
them and none of them imports anything of jaxseg.

The command-line tools print these (`user_errors()`) as one line and exit with status 2, no
traceback: they report a config, file or dataset the user can fix, not a bug in jaxseg.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config field has a value the run cannot use; the message names the field and what
  would be valid."""


class InvalidDatasetError(ValueError):
  """A dataset file or layout problem; the message names the file and the fix.

  Example: ``labelsTr/case_007.nii.gz has shape (240, 240, 154) but its image
  has (240, 240, 155)``.
  """


class WorkdirMismatchError(ValueError):
  """A run directory that holds another run (another dataset, channels, classes or model).

  Example: ``--workdir runs/a holds a run with channels ['T1'] (plan.json); this config has
  ['T1', 'T2', 'FLAIR']: use another --workdir``.
  """


def user_errors() -> tuple:
  """Exceptions that report bad input (config, files, data) rather than a bug in jaxseg."""
  return (ConfigError, InvalidDatasetError, WorkdirMismatchError, FileNotFoundError,
          FloatingPointError)
