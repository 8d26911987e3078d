"""``python -m cnnserve.cli``: the same as the ``cnnserve`` command."""

from __future__ import annotations

import sys

from cnnserve.cli import main

sys.exit(main())
