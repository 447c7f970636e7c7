"""Errors raised for datasets that jaxseg cannot use."""


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
