"""Speculation that adapts while it serves: observers of verification steps (``base``), and
the built-in one, test-time drafter distillation (``test_time``)."""
