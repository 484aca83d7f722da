"""hetmap."""
