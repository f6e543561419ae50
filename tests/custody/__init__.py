"""Tests of the custody backends."""
