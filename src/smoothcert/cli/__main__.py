"""``python -m smoothcert.cli``: the command line."""

import sys

from smoothcert.cli.main import main

sys.exit(main())
