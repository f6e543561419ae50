"""Primitives shared by every layer: hashing, secp256k1 signatures, secret wrappers."""
