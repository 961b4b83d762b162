"""Recipes: what a project asks for, and the key that names what it gets.

- :mod:`.schema`: the recipe format, declared once (validation with did-you-mean, defaults, the README key table);
- :mod:`.project`: ``ocibuild.toml`` and ``layers/<name>/layer.toml`` → :class:`~.project.Project`;
- :mod:`.lock`: ``ocibuild.lock``, the moving inputs resolved to digests (read and serialised);
- :mod:`.key`: a layer's cache key, the one canonical key document.

Inside the package: ``project`` reads ``schema``; ``key`` reads ``project``; ``lock`` stands alone.
"""
