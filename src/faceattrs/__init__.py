"""faceattrs: gender, ethnicity and age from face images.

Stages, one module each: ``data`` (read, validate), ``dedup``, ``prepare`` (split, cache),
``augment``, ``model``, ``engine`` / ``train``, ``metrics``, ``plots``, ``evaluate``,
``explain``, ``errors``, ``age``, ``photo``, ``predict``, ``export``; ``cli`` on top.
"""

__version__ = "0.1.0"
