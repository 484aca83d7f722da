"""What every part of hetmap shares: the error hierarchy and the crossbar tile grid.

A leaf package: it imports nothing of hetmap, so the compiler, the runtime and the targets
can all depend on it without depending on each other.
"""
