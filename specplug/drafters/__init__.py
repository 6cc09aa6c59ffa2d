"""Built-in drafters; each module registers its drafter through the plugin hooks."""
