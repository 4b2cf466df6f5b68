"""Credentials the sidecar rotates itself: create, verify, publish, retire, roll back.

``config.py`` validates the ``rotate:`` section; ``store.py`` is the shared record
replicas coordinate through (KV v2; ``awsstore.py``: AWS Secrets Manager with its
staging labels); ``manager.py`` drives the schedule and the
claim/publish protocol; one module per kind does the credential-specific steps.
"""
