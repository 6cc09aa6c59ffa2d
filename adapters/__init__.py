"""Thin adapters that plug specplug's core into frameworks (imported on demand)."""
