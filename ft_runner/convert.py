"""`python -m ft_runner.convert`: see ft_runner.checkpoint.convert."""

import sys

from ft_runner.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
