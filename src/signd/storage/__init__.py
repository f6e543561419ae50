"""Storage: a blob store for ciphertext and a metadata store for key descriptions."""
