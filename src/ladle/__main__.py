"""``python -m ladle``: the ``ladle`` command, where the console script is not on ``PATH``
(``python -m ladle soup A B -o OUT``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
