"""``specplug bench``: side-by-side speed and acceptance against what users run today."""
