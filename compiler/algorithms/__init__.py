"""The algorithms the passes call, one module per pass and named after it (``passes/tile.py``
calls the tile grid of :mod:`hetmap.common.grid`, ``passes/allocate.py`` calls
``algorithms/allocate.py``, and so on). They work on arrays and plain data, not on the IR."""
