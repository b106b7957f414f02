#!/usr/bin/env python3
"""Serve a HuggingFace causal LM from a TP x PP grid of MPI ranks through PyTriton.

    mpirun -n <TP*PP> python server.py --tp T --pp P [--hf-model-name NAME_OR_DIR]
"""

import sys

from ft_runner.serving.server import main

if __name__ == "__main__":
    sys.exit(main())
