"""Credentials the sidecar rotates itself: create, verify, publish, retire, roll back.

``config.py`` validates the ``rotate:`` section; ``store.py`` is the shared KV v2
record replicas coordinate through; ``manager.py`` drives the schedule and the
claim/publish protocol; one module per kind does the credential-specific steps.
"""
