#!/usr/bin/env python3
"""Query an ft_runner server:  python client.py --url http://HOST:8000 --prompts "Thank you for" """

import sys

from ft_runner.client import main

if __name__ == "__main__":
    sys.exit(main())
