"""`python -m sparsek ...`: see `sparsek.cli`."""

import sys

from sparsek.cli import main

sys.exit(main())
