"""Helpers the tests share: fake exchanges, bots run by path, real-server harnesses (not tests)."""
