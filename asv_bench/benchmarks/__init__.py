"""asv benchmarks of numba_attn: prefill, decode and layer areas (see ../README.md).

In an environment asv builds (``environment_type`` virtualenv) numba_attn is the installed wheel
of the commit under test. With ``asv run --python=same`` asv installs nothing; if numba_attn is not
importable there, the working tree this file lives in is put on ``sys.path`` (the same as
``ASV_PYTHONPATH=$PWD/..``). Only then: a virtualenv without numba_attn stays an import error.
"""

import os
import sys

try:
    import numba_attn
except ImportError:
    if os.environ.get("ASV_ENV_TYPE", "existing") != "existing":
        raise
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
    import numba_attn  # noqa: F401
