"""The compiler: front end, IR, passes and the algorithms they call, back ends, evaluation, and the
driver (``api``, ``cli``, ``registry``)."""
