"""``specplug train``: self-distilled training of draft heads on the target's own outputs."""
