"""Recipes: the recipe format's schema, the project and its layers, ``ocibuild.lock``, and the cache key."""
