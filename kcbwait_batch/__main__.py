"""``python -m kcbwait_batch``: the same as the ``kcbwait-batch`` command."""

import sys

from kcbwait_batch.cli import main

sys.exit(main())
