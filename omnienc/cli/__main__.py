"""``python -m omnienc.cli``: the ``omnienc`` command, for interpreters without the script."""

import sys

from omnienc.cli.command import main

sys.exit(main())
