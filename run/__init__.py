"""Running `main.py`: the checks of the whole command line before any work is spent (`preflight`), the modes as
sequences of stages (`pipeline`), and the knowledge stage sharded over processes, GPUs and hosts under torchrun
(`distributed`).

The top of the package graph: it may import every other package; only `main.py` imports it.
"""
