"""Tests for signd.chains."""
