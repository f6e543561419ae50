"""Tests of the local keystore custody backend."""
