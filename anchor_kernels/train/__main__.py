"""``python -m anchor_kernels.train --help``"""

import sys

from .trainer import main

sys.exit(main())
