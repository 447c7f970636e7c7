"""The child process of `jaxseg.cpu_conv.onednn.self_check`.

    JAXSEG_ONEDNN_LIB=path/libjaxseg_onednn.so python -m jaxseg.cpu_conv.onednn_selfcheck

registers the library at $JAXSEG_ONEDNN_LIB (without a cached verdict) and runs the check
against lax; exit status 0 when it passes, 1 with the difference on stderr when it does not
(a crash in native code kills only this process).
"""

import os
import pathlib
import sys

from jaxseg.cpu_conv import onednn


def main() -> int:
  onednn._register(pathlib.Path(os.environ['JAXSEG_ONEDNN_LIB']))  # noqa: SLF001
  try:
    onednn._check_in_process()  # noqa: SLF001
  except AssertionError as e:
    print(e, file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
