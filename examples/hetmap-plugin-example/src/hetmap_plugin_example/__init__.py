"""Example hetmap plugin (see the package README)."""
