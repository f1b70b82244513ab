"""Feature extractors as plain numpy functions and classes (no Beam, no I/O)."""
