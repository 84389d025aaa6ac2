"""`python -m qe_factory.cli`."""

import sys

from qe_factory.cli import main

sys.exit(main())
