"""Tests for signd.chains.ethereum."""
