"""Moving task files between the server's store and workers, always verified by SHA-256."""
