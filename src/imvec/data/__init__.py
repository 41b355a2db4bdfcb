"""Image sources and decoding."""
